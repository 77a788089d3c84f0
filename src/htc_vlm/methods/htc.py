"""HTC-VLM (this paper): discrete anchors from the VQ latent prepended to the patches, the hybrid
sequence compressed into voco under the disentanglement mask (Eqs. 3-9)."""

from .registry import trained_method

METHOD = trained_method(
    "htc", "num_voco", tables=("1", "2"),
    paper="Hybrid Token Compression for Vision-Language Models (HTC-VLM)",
    summary="[anchors; patches] -> voco under the disentanglement mask",
)
