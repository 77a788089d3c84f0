"""Discrete only (the paper's Table 4 ablation): every VQ latent position, projected, compressed
into voco; no patch token reaches the language model."""

from ..anchors import DiscreteTokenProjector
from .compression import Compression
from .registry import trained_method


class DiscreteOnly(Compression):
    """q (B, C*h*w) -> one token per latent position, (B, h*w, D); the pixels are not read."""

    name = "discrete"
    needs_latents = True
    reads_pixels = False

    def num_image_tokens(self, config):
        return config.discrete_grid * config.discrete_grid

    def modules(self, config):
        return {"discrete_projector": DiscreteTokenProjector(config)}

    def unused_modules(self, config):  # no patch token reaches the language model
        return super().unused_modules(config) + ("multi_modal_projector", "vision_tower")

    def image_block(self, model, pixel_values, q):
        q = model.check_latents(q, 0 if q is None else q.shape[0])
        return model.discrete_projector(q.to(model.discrete_projector.linear_1.weight.dtype))


METHOD = trained_method(
    DiscreteOnly(), tables=("1",),
    paper="Hybrid Token Compression for Vision-Language Models (HTC-VLM), Table 4 ablation",
    summary="VQ tokens only -> voco",
    label="discrete only",
)
