"""HTC-VLM (this paper): discrete anchors from the VQ latent prepended to the patches, the hybrid
sequence compressed into voco under the disentanglement mask (Eqs. 3-9)."""

from .registry import Method, register, trained_loader

METHOD = register(Method(
    name="htc", kind="trained", tables=("1", "2"),
    paper="Hybrid Token Compression for Vision-Language Models (HTC-VLM)",
    summary="[anchors; patches] -> voco under the disentanglement mask",
    load=trained_loader("htc", "num_voco"),
    train_overrides=lambda budget: ["model.compression=htc", f"model.num_voco={budget}"],
))
