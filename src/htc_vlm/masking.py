"""The disentanglement attention mask M_hy of Eq. 6, as an additive float 4D mask.

For a prompt ``[p] [a1 a2 v1 v2] [z] [t1 t2]`` (one prefix token p, two anchors a, two patches v,
one voco z, two text tokens t), ``x`` = may attend, ``.`` = may not, rows are queries::

    compression on, vision_attention="causal"        compression on, vision_attention="isolated"
           p a1 a2 v1 v2 z t1 t2                            p a1 a2 v1 v2 z t1 t2
      p    x  .  .  .  .  .  .  .                      p    x  .  .  .  .  .  .  .
      a1   x  x  .  .  .  .  .  .                      a1   x  x  .  .  .  .  .  .
      a2   x  x  x  .  .  .  .  .                      a2   x  .  x  .  .  .  .  .
      v1   x  x  x  x  .  .  .  .                      v1   x  .  .  x  .  .  .  .
      v2   x  x  x  x  x  .  .  .                      v2   x  .  .  .  x  .  .  .
      z    x  x  x  x  x  x  .  .                      z    x  x  x  x  x  x  .  .
      t1   x  .  .  .  .  x  x  .                      t1   x  .  .  .  .  x  x  .
      t2   x  .  .  .  .  x  x  x                      t2   x  .  .  .  .  x  x  x

Text never sees the hybrid block, only voco (and the prefix and earlier text); voco sees all of
the block. With compression off the mask is plain causal. Everything is causal, so a left-padding
position is never seen by a real token; each padding query row sees itself only, so no row is
empty (an all-masked row gives zeros under sdpa and a uniform average under eager).

The mask is additive (0 or ``finfo(dtype).min``) because eager attention adds the mask to the
scores: a bool mask would silently be added as 0/1 there.
"""

from __future__ import annotations

import torch

from .layout import IMAGE, PAD, TEXT


def allowed_attention(kinds: torch.Tensor, compress: bool, vision_attention: str = "causal",
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    """Which key each query may attend to, from the token kinds (B, T): bool (B, T, T).

    ``segments`` (B, T), for packed sequences: 0 marks the head (prefix, image block, voco), k > 0 the
    k-th packed record; a record sees the head and itself, never another record."""
    t = kinds.shape[1]
    idx = torch.arange(t, device=kinds.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key <= query
    q, k = kinds[:, :, None], kinds[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = causal & (k != PAD)
    if compress:
        allowed = allowed & ~((q == TEXT) & (k == IMAGE))  # text sees the image only through voco
        if vision_attention == "isolated":
            allowed = allowed & ~((q == IMAGE) & (k == IMAGE) & (idx[:, None] != idx[None, :]))
    if segments is not None:
        sq, sk = segments[:, :, None], segments[:, None, :]
        allowed = allowed & ((sk == 0) | (sk == sq))
    return allowed | ((q == PAD) & (idx[:, None] == idx[None, :]))


def attention_mask_4d(kinds: torch.Tensor, compress: bool, vision_attention: str, dtype: torch.dtype,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    """The additive mask the language model receives: 0 where allowed, float min elsewhere. (B, 1, T, T)"""
    allowed = allowed_attention(kinds, compress, vision_attention, segments)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=kinds.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
