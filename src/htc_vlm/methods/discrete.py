"""Discrete only (the paper's Table 4 ablation): every VQ latent position, projected, compressed
into voco; no patch token reaches the language model."""

from .registry import Method, register, trained_loader

METHOD = register(Method(
    name="discrete", kind="trained", tables=("1",),
    paper="Hybrid Token Compression for Vision-Language Models (HTC-VLM), Table 4 ablation",
    summary="VQ tokens only -> voco",
    load=trained_loader("discrete", "num_voco"),
    train_overrides=lambda budget: ["model.compression=discrete", f"model.num_voco={budget}"],
))
