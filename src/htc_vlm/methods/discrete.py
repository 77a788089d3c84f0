"""Discrete only (the paper's Table 4 ablation): every VQ latent position, projected, compressed
into voco; no patch token reaches the language model."""

from .registry import trained_method

METHOD = trained_method(
    "discrete", "num_voco", tables=("1",),
    paper="Hybrid Token Compression for Vision-Language Models (HTC-VLM), Table 4 ablation",
    summary="VQ tokens only -> voco",
)
