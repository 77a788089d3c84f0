"""Q-Former: learned queries cross-attend to the patch tokens (one block; module
:class:`htc_vlm.pooling.QFormerPooler`); their outputs are the visual tokens."""

from .registry import Method, register, trained_loader

METHOD = register(Method(
    name="qformer", kind="trained", tables=("1",),
    paper="Li et al. 2023, BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and LLMs",
    summary="one learned query cross-attending to the patches",
    load=trained_loader("qformer", "pool_tokens"),
    train_overrides=lambda budget: ["model.compression=qformer", f"model.pool_tokens={budget}"],
))
