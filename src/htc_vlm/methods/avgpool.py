"""Average pooling: the mean of the projected patch tokens is the visual token the text sees
(module: :class:`htc_vlm.pooling.AvgPool`), trained by the compress stage like the others."""

from .registry import Method, register, trained_loader

METHOD = register(Method(
    name="avgpool", kind="trained", tables=("1",),
    paper="the pooling baseline of VoCo-LLaMA's and HTC-VLM's Table 1",
    summary="mean of the patch tokens",
    load=trained_loader("avgpool", "pool_tokens"),
    train_overrides=lambda budget: ["model.compression=avgpool", f"model.pool_tokens={budget}"],
))
