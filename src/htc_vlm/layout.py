"""Where each block sits in the sequence, read from the placeholder tokens of ``input_ids``.

A prompt is ``[prefix text] [image block] [voco x num_voco] [text ...]``: the image block is
``config.num_image_tokens`` ``<image>`` placeholders (anchors and patches), the voco tokens follow it
at once, and the question comes after, so the compressed image never depends on the question.
Samples without ``<image>`` are plain text. Left padding is marked by ``attention_mask == 0``.
"""

from __future__ import annotations

import torch

from .configuration import HTCConfig
from .errors import HTCError

# Token kinds, one per position: (B, T) int8
PAD, TEXT, IMAGE, VOCO = 0, 1, 2, 3


def token_kinds(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: HTCConfig) -> torch.Tensor:
    """Kinds of every position, after checking the layout of each sample: (B, T)."""
    kinds = torch.full_like(input_ids, TEXT, dtype=torch.int8)
    kinds[input_ids == config.image_token_id] = IMAGE
    kinds[input_ids == config.voco_token_id] = VOCO
    if attention_mask is not None:
        kinds[attention_mask == 0] = PAD
    n_img = config.num_image_tokens
    for b in range(input_ids.shape[0]):
        k = kinds[b]
        img = (k == IMAGE).nonzero().flatten()
        voco = (k == VOCO).nonzero().flatten()
        if img.numel() == 0:
            if voco.numel():
                raise HTCError(f"sample {b} has {voco.numel()} <voco> tokens but no <image> block")
            continue
        if img.numel() != n_img or img[-1] - img[0] + 1 != n_img:
            raise HTCError(f"sample {b} has {img.numel()} <image> placeholders (contiguous: "
                           f"{bool(img[-1] - img[0] + 1 == img.numel())}); this config expects one contiguous block "
                           f"of {n_img} (compression={config.compression!r}, fusion={config.fusion!r})")
        if config.compresses or voco.numel():
            want = torch.arange(config.num_voco) + img[-1] + 1
            if voco.numel() != config.num_voco or not torch.equal(voco.cpu(), want):
                raise HTCError(f"sample {b} must have exactly {config.num_voco} <voco> tokens right after its image "
                               f"block, got {voco.numel()} at positions {voco.tolist()}")
    return kinds


def image_prompt_ids(config: HTCConfig, prefix: list[int] | None = None) -> list[int]:
    """The question-independent head of a prompt: prefix, image placeholders, then voco."""
    voco = [config.voco_token_id] * config.num_voco if config.compresses else []
    return list(prefix or []) + [config.image_token_id] * config.num_image_tokens + voco


def check_context(config: HTCConfig, length: int, what: str) -> None:
    """Refuse ``length`` positions past the language model's context (before anything is allocated:
    an over-long question would otherwise build attention masks of its length squared)."""
    limit = config.text_config.max_position_embeddings
    if length > limit:
        raise HTCError(f"{what} needs {length} positions (image block, question and answer); the language "
                       f"model's context is {limit}")


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that skip left padding: (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(ids, attention_mask)``, both (B, T): the layout generation uses."""
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, t - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, t - len(r):] = 1
    return ids, mask
