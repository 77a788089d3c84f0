"""Trained pooling baselines of Table 1: the patch tokens reduced to ``pool_tokens`` tokens that the
text attends to directly (no voco, no disentanglement mask).

- ``avgpool``: the mean of the projected patch tokens (adaptive average pooling over the patch
  order when ``pool_tokens`` > 1). No parameters of its own: projector and language model learn to
  use the mean.
- ``qformer``: BLIP-2's idea (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training
  with Frozen Image Encoders and Large Language Models") at the size of one block: ``pool_tokens``
  learned queries cross-attend to the projected patches, then a GELU MLP, both pre-norm residual.
  BLIP-2's Q-Former is a 12-layer BERT with 32 queries and its own pre-training; ours is trained
  from the upper-bound model by the ``compress`` stage like every other Table 1 method.

Shape notation: B images, N patches, K = pool_tokens, D language-model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import HTCConfig


class AvgPool(nn.Module):
    def __init__(self, config: HTCConfig):
        super().__init__()
        self.k = config.pool_tokens

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, K, D)"""
        return F.adaptive_avg_pool1d(v.transpose(1, 2), self.k).transpose(1, 2)


class QFormerPooler(nn.Module):
    def __init__(self, config: HTCConfig):
        super().__init__()
        d = config.text_config.hidden_size
        heads = config.text_config.num_attention_heads
        self.queries = nn.Parameter(torch.randn(config.pool_tokens, d) * 0.02)  # (K, D)
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, K, D)"""
        q = self.queries.to(v.dtype).expand(v.shape[0], -1, -1)  # (B, K, D)
        kv = self.norm_kv(v)
        x = q + self.cross_attention(self.norm_q(q), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))
