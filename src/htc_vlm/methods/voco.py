"""VoCo-LLaMA: the patch tokens are compressed into ``num_voco`` voco tokens by the language model
itself under the voco attention mask; only the voco keys/values are kept (continuous channel only)."""

from .compression import Compression
from .registry import trained_method


class VoCo(Compression):
    """The patches as they are; the disentanglement mask and the voco tokens do the compressing."""

    name = "voco"


METHOD = trained_method(
    VoCo(), tables=("1", "2"),
    paper="Ye et al. 2025, VoCo-LLaMA: Towards Vision Compression with Large Language Models",
    summary="patches -> voco under the disentanglement mask",
    label="VoCo-LLaMA",
)
