"""The continuous channel (Eq. 3): a transformers vision tower and the projector P_v.

Shape notation: B images, N patch tokens, Dv vision width, D language-model width.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel

from .configuration import HTCConfig
from .errors import HTCError


class Projector(nn.Module):
    """P_v: ``linear`` or LLaVA-1.5's ``mlp2x_gelu``; parameter names match transformers' LLaVA
    (``linear_1``, ``linear_2``) so LLaVA checkpoints load without renaming."""

    def __init__(self, in_dim: int, out_dim: int, kind: str, bias: bool = True, norm: bool = False):
        super().__init__()
        if norm:
            self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "norm"):
            x = self.norm(x)
        x = self.linear_1(x)
        if hasattr(self, "linear_2"):
            x = self.linear_2(self.act(x))
        return x


def build_vision_tower(config: HTCConfig) -> nn.Module:
    return AutoModel.from_config(config.vision_config)


def check_pixels(pixel_values: torch.Tensor, config: HTCConfig) -> None:
    """One clear error for a wrong image size or channel count."""
    vc = config.vision_config
    expected = (vc.num_channels, vc.image_size, vc.image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise HTCError(f"pixel_values must be (B, {expected[0]}, {expected[1]}, {expected[2]}) for this vision "
                       f"tower, got {tuple(pixel_values.shape)}")


def patch_features(tower: nn.Module, pixel_values: torch.Tensor, config: HTCConfig) -> torch.Tensor:
    """Vision features of ``config.vision_feature_layer``, CLS dropped for ``"default"``: (B, N, Dv)."""
    check_pixels(pixel_values, config)
    out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    h = out.hidden_states[config.vision_feature_layer]  # (B, N(+1), Dv)
    if config.vision_feature_select_strategy == "default":
        h = h[:, 1:]
    if h.shape[1] != config.num_patches:
        raise HTCError(f"the vision tower gave {h.shape[1]} patch tokens but the config expects {config.num_patches}; "
                       f"towers without a CLS token (SigLIP) need vision_feature_select_strategy='full' "
                       f"and vision_has_cls=False")
    return h
