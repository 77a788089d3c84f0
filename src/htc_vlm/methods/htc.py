"""HTC-VLM (this paper): discrete anchors from the VQ latent prepended to the patches, the hybrid
sequence compressed into voco under the disentanglement mask (Eqs. 3-9)."""

import torch

from ..anchors import AnchorProjector
from ..errors import HTCError
from .compression import Compression
from .registry import trained_method


class Hybrid(Compression):
    """[anchors; patches] (``fusion="pre"``, the paper's), [patches; anchors] (``"post"``), or the
    anchors' mean added to every patch (``"mean"``, our reading of the paper's mean fusion)."""

    name = "htc"
    needs_latents = True

    def validate(self, config):
        super().validate(config)
        if config.num_anchors < 1:
            raise HTCError(f"compression='htc' needs num_anchors >= 1, got {config.num_anchors}")

    def num_image_tokens(self, config):
        return config.num_patches + (0 if config.fusion == "mean" else config.num_anchors)

    def num_anchors(self, config):
        return config.num_anchors if config.fusion == "pre" else 0

    def modules(self, config):
        return {"anchor_projector": AnchorProjector(config)}

    def image_block(self, model, pixel_values, q):
        v = model.patch_embeddings(pixel_values)  # (B, N, D)
        a = model.discrete_anchors(model.check_latents(q, v.shape[0]))  # (B, N_d, D), one q per image
        fusion = model.config.fusion
        if fusion == "pre":
            return torch.cat([a, v], dim=1)
        if fusion == "post":
            return torch.cat([v, a], dim=1)
        return v + a.mean(dim=1, keepdim=True)


METHOD = trained_method(
    Hybrid(), tables=("1", "2"),
    paper="Hybrid Token Compression for Vision-Language Models (HTC-VLM)",
    summary="[anchors; patches] -> voco under the disentanglement mask",
    label="HTC (ours)",
)
