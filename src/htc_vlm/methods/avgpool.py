"""Average pooling: the mean of the projected patch tokens is the visual token the text sees
(module: :class:`htc_vlm.pooling.AvgPool`), trained by the compress stage like the others."""

from .registry import trained_method

METHOD = trained_method(
    "avgpool", "pool_tokens", tables=("1",),
    paper="the pooling baseline of VoCo-LLaMA's and HTC-VLM's Table 1",
    summary="mean of the patch tokens",
)
