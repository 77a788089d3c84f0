"""Average pooling: the mean of the projected patch tokens is the visual token the text sees
(module: :class:`htc_vlm.pooling.AvgPool`), trained by the compress stage like the others."""

from ..pooling import AvgPool
from .compression import PooledCompression
from .registry import trained_method


class AveragePooling(PooledCompression):
    name = "avgpool"
    pooler = AvgPool


METHOD = trained_method(
    AveragePooling(), tables=("1",),
    paper="the pooling baseline of VoCo-LLaMA's and HTC-VLM's Table 1",
    summary="mean of the patch tokens",
    label="average pooling",
)
