"""The discrete channel's heads: q (the flattened VQ latent) to language-model tokens.

Shape notation: B images, Q = C*h*w the length of q, C latent channels, P = h*w latent positions,
N_d anchors, D language-model width.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import HTCConfig


class AnchorProjector(nn.Module):
    """P_d of Eq. 4: ``v_d = GELU(W2 GELU(W1 q))``, reshaped to N_d anchor tokens.

    The paper's sizes for N_d = 4 at D = 4096 and MGVQ f16c32 at 336 px: W1 is 16384 x 14112, W2
    16384 x 16384 (``anchor_hidden_size`` defaults to ``N_d * D``). Both GELUs are the paper's.
    """

    def __init__(self, config: HTCConfig):
        super().__init__()
        d = config.text_config.hidden_size
        hidden = config.anchor_hidden_size or config.num_anchors * d
        self.num_anchors = config.num_anchors
        self.linear_1 = nn.Linear(config.discrete_dim, hidden)
        self.linear_2 = nn.Linear(hidden, config.num_anchors * d)
        self.act = nn.GELU()

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        v = self.act(self.linear_2(self.act(self.linear_1(q))))  # (B, N_d * D)
        return v.view(q.shape[0], self.num_anchors, -1)  # (B, N_d, D)


class DiscreteTokenProjector(nn.Module):
    """The discrete-only ablation: every latent position becomes one token (441 at 336 px).

    q is the flattened ``(C, h, w)`` latent (MGVQ's layout), so position p's vector is
    ``q.view(B, C, P)[:, :, p]``; an ``mlp2x_gelu`` maps its C channels to D.
    """

    def __init__(self, config: HTCConfig):
        super().__init__()
        d = config.text_config.hidden_size
        self.channels = config.discrete_channels
        self.linear_1 = nn.Linear(config.discrete_channels, d)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d, d)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = q.view(q.shape[0], self.channels, -1).transpose(1, 2)  # (B, P, C)
        return self.linear_2(self.act(self.linear_1(x)))  # (B, P, D)
