"""Q-Former: learned queries cross-attend to the patch tokens (one block; module
:class:`htc_vlm.pooling.QFormerPooler`); their outputs are the visual tokens."""

from ..pooling import QFormerPooler
from .compression import PooledCompression
from .registry import trained_method


class QFormer(PooledCompression):
    name = "qformer"
    pooler = QFormerPooler


METHOD = trained_method(
    QFormer(), tables=("1",),
    paper="Li et al. 2023, BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and LLMs",
    summary="one learned query cross-attending to the patches",
    label="Q-Former",
)
