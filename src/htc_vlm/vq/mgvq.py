"""MGVQ's released tokenizers (MKJia/MGVQ, ``mgvq_f16c32_g8.pt``): codes computed with MGVQ's own
encoder, turned into our feature store with the checkpoint's codebook.

MGVQ's encoder is EfficientViT's deep-compression autoencoder (ResBlock and EViT-GLU stages, a
Triton RMS norm); it is not re-implemented here. Its quantizer is small and exact to reproduce:
``quantize.embedding.weight`` holds ``n_e = G * K`` code vectors of ``C / G`` dims, group ``g``
owning rows ``[g K, (g + 1) K)``, each row L2-normalised when used. ``VectorQuantizer.
get_codebook_entry`` maps codes (B, h * w, G) to the quantized latent (B, C, h, w) whose channels
``[g C/G, (g + 1) C/G)`` are group ``g``'s vector: the q our discrete channel reads, flattened in
(C, h, w) order. So a user runs MGVQ's ``encode`` once (its third output's last item is the codes,
(B * h * w, G)), saves them per image, and :func:`import_codes` writes the store.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ..errors import HTCError
from .store import write_store

CODEBOOK_KEY = "quantize.embedding.weight"


def load_codebooks(ckpt: str | Path, groups: int) -> torch.Tensor:
    """(G, K, C / G) L2-normalised codebooks of an MGVQ checkpoint (``{"state_dict": ...}``, read
    with ``weights_only=True``) split into ``groups`` groups."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise HTCError(f"MGVQ checkpoint not found: {ckpt}")
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; anything else unreadable is one error too
        raise HTCError(f"cannot read {ckpt} as an MGVQ checkpoint of plain tensors: {e}") from e
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or CODEBOOK_KEY not in state:
        raise HTCError(f"{ckpt} has no {CODEBOOK_KEY} (not an MGVQ tokenizer checkpoint)")
    emb = state[CODEBOOK_KEY].float()
    if emb.ndim != 2 or emb.shape[0] % groups:
        raise HTCError(f"{CODEBOOK_KEY} of {ckpt} is {tuple(emb.shape)}: not {groups} groups of codes")
    return F.normalize(emb, p=2, dim=-1).reshape(groups, emb.shape[0] // groups, emb.shape[1])


def quant_from_codes(codes: torch.Tensor, codebooks: torch.Tensor, grid: int) -> torch.Tensor:
    """Codes (h * w, G) or (h, w, G), row-major over the grid -> the quantized latent (C, h, w)."""
    g, k, d = codebooks.shape
    codes = codes.reshape(-1, codes.shape[-1]).long()
    if codes.shape != (grid * grid, g):
        raise HTCError(f"codes of shape {tuple(codes.shape)}: expected ({grid * grid}, {g}) for a {grid} x {grid} grid "
                       f"and {g} groups")
    if codes.min() < 0 or codes.max() >= k:
        raise HTCError(f"codes outside [0, {k}) (the checkpoint has {k} codes per group)")
    per_group = [codebooks[i][codes[:, i]] for i in range(g)]  # G x (h*w, d)
    return torch.cat(per_group, dim=-1).reshape(grid, grid, g * d).permute(2, 0, 1).contiguous()  # (C, h, w)


def import_codes(ckpt: str | Path, codes: str | Path, out: str | Path, groups: int = 8, grid: int = 21,
                 shard_size: int = 50_000) -> int:
    """Write the feature store ``out`` from ``codes`` (a safetensors file of ``{image_id: codes}``);
    returns the number of images."""
    books = load_codebooks(ckpt, groups)
    feats = {}
    try:
        with safe_open(str(codes), "pt") as f:
            for key in f.keys():
                feats[key] = quant_from_codes(f.get_tensor(key), books, grid)
    except (OSError, SafetensorError) as e:
        raise HTCError(f"cannot read the codes file {codes}: {e}") from e
    except HTCError as e:
        raise HTCError(f"image {key!r} in {codes}: {e}") from e
    if not feats:
        raise HTCError(f"{codes} holds no codes")
    c = books.shape[0] * books.shape[2]
    write_store(feats, out, shard_size, metadata={"channels": c, "grid": grid, "q_dim": c * grid * grid,
                                                  "tokenizer": f"MGVQ {Path(ckpt).name}"})
    return len(feats)
