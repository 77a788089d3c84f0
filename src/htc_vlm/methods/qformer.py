"""Q-Former: learned queries cross-attend to the patch tokens (one block; module
:class:`htc_vlm.pooling.QFormerPooler`); their outputs are the visual tokens."""

from .registry import trained_method

METHOD = trained_method(
    "qformer", "pool_tokens", tables=("1",),
    paper="Li et al. 2023, BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and LLMs",
    summary="one learned query cross-attending to the patches",
)
