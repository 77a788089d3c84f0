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


def _allowed(qk, kk, qi, ki, sq, sk, compress: bool, isolated: bool):
    """The rule itself, elementwise on broadcastable tensors: query / key kinds, positions and segments."""
    allowed = (ki <= qi) & (kk != PAD)
    if compress:
        allowed = allowed & ~((qk == TEXT) & (kk == IMAGE))  # text sees the image only through voco
        if isolated:
            allowed = allowed & ~((qk == IMAGE) & (kk == IMAGE) & (qi != ki))
    if sq is not None:  # packed records see the head (segment 0) and themselves
        allowed = allowed & ((sk == 0) | (sk == sq))
    return allowed | ((qk == PAD) & (qi == ki))


def allowed_attention(kinds: torch.Tensor, compress: bool, vision_attention: str = "causal",
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    """Which key each query may attend to, from the token kinds (B, T): bool (B, T, T).

    ``segments`` (B, T), for packed sequences: 0 marks the head (prefix, image block, voco), k > 0 the
    k-th packed record; a record sees the head and itself, never another record."""
    idx = torch.arange(kinds.shape[1], device=kinds.device)
    seg = (segments[:, :, None], segments[:, None, :]) if segments is not None else (None, None)
    return _allowed(kinds[:, :, None], kinds[:, None, :], idx[:, None], idx[None, :], *seg,
                    compress, compress and vision_attention == "isolated")


def attention_mask_4d(kinds: torch.Tensor, compress: bool, vision_attention: str, dtype: torch.dtype,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    """The additive mask the language model receives: 0 where allowed, float min elsewhere. (B, 1, T, T)"""
    allowed = allowed_attention(kinds, compress, vision_attention, segments)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=kinds.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def mask_mod(kinds: torch.Tensor, compress: bool, vision_attention: str, segments: torch.Tensor | None = None):
    """The rule as a flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` reading the (B, T) kinds and
    segments: no (B, T, T) tensor."""
    isolated = compress and vision_attention == "isolated"
    kinds = kinds.to(torch.int32)
    segments = segments.to(torch.int32) if segments is not None else None

    def rule(b, h, qi, ki):
        seg = (segments[b, qi], segments[b, ki]) if segments is not None else (None, None)
        return _allowed(kinds[b, qi], kinds[b, ki], qi, ki, *seg, compress, isolated)

    return rule


def block_mask(kinds: torch.Tensor, compress: bool, vision_attention: str, segments: torch.Tensor | None = None):
    """The same mask as a ``flex_attention`` BlockMask, for ``attn_implementation="flex_attention"``.
    On a GPU it is built from :func:`mask_mod` (compiled, per block), so no (B, 1, T, T) tensor is
    kept and fully masked blocks (text x image) are skipped by the kernel. On a CPU it reads the dense
    boolean table instead: inductor's CPU flex kernel does not compile the kinds look-ups (torch 2.13)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = kinds.shape
    if kinds.is_cuda:
        return create_block_mask(mask_mod(kinds, compress, vision_attention, segments), b, None, t, t,
                                 device=kinds.device, _compile=True)
    allowed = allowed_attention(kinds, compress, vision_attention, segments)  # (B, T, T)
    return create_block_mask(lambda b_, h, qi, ki: allowed[b_, qi, ki], b, None, t, t, device=kinds.device)
