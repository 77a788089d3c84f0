"""VisualCache: the compressed image as the language model's keys and values, and nothing else.

``model.compress`` runs the prefix, the image block and the voco tokens once, then keeps only the
positions text may attend to (the prefix and the voco tokens; all positions when compression is
off). RoPE is already applied to the cached keys, so the question that follows must continue at
the *original* position (``next_position``), not at the cache length.

On disk a cache is one safetensors file: ``keys.{layer}`` / ``values.{layer}`` tensors of shape
(B, kv_heads, K, head_dim), and metadata naming the format version, the fingerprint of the model
that made it, the positions, and a SHA-256 of the tensor bytes and of that metadata (an edited file,
``next_position`` included, is refused).

Shape notation: B images, L layers, H kv heads, K kept positions, Dh head dim.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import DynamicCache

from .errors import HTCError
from .io import atomic_write_bytes

FORMAT = "htc-vlm-visual-cache"
FORMAT_VERSION = 2  # 2: the checksum covers the metadata too


@dataclass
class VisualCache:
    keys: list[torch.Tensor]  # L x (B, H, K, Dh)
    values: list[torch.Tensor]  # L x (B, H, K, Dh)
    next_position: int  # position of the first token after the image block and voco
    fingerprint: str  # of the model that made it
    meta: dict = field(default_factory=dict)  # compression settings, kept positions, ...

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        """K: cached positions per image (1 for one voco token and no prefix)."""
        return self.keys[0].shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to_dynamic_cache(self) -> DynamicCache:
        """A fresh transformers cache holding copies (generation appends to it)."""
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.clone(), v.clone(), i)
        return cache

    def select(self, index: int | list[int]) -> "VisualCache":
        """The caches of some images of the batch (e.g. one image, or images repeated per question)."""
        idx = torch.as_tensor([index] if isinstance(index, int) else index, dtype=torch.long)
        return VisualCache([k[idx] for k in self.keys], [v[idx] for v in self.values],
                           self.next_position, self.fingerprint, dict(self.meta))

    @staticmethod
    def cat(caches: list["VisualCache"]) -> "VisualCache":
        first = caches[0]
        for c in caches[1:]:
            if c.fingerprint != first.fingerprint or c.next_position != first.next_position or c.length != first.length:
                raise HTCError("cannot batch visual caches made by different models or with different layouts")
        return VisualCache([torch.cat(t) for t in zip(*(c.keys for c in caches))],
                           [torch.cat(t) for t in zip(*(c.values for c in caches))],
                           first.next_position, first.fingerprint, dict(first.meta))

    def split(self, n: int) -> tuple["VisualCache", "VisualCache"]:
        """(the first ``n`` cached positions, the rest), e.g. the template prefix and the image part.
        The prefix precedes the image and attends causally, so it is the same for every image."""
        head = VisualCache([k[:, :, :n] for k in self.keys], [v[:, :, :n] for v in self.values],
                           self.next_position, self.fingerprint, dict(self.meta))
        tail = VisualCache([k[:, :, n:].contiguous() for k in self.keys], [v[:, :, n:].contiguous() for v in self.values],
                           self.next_position, self.fingerprint, dict(self.meta) | {"prefix_shared": n})
        return head, tail

    def after(self, prefix: "VisualCache") -> "VisualCache":
        """This cache with ``prefix`` (one image's worth) put back in front, repeated per image."""
        b = self.batch_size
        return VisualCache([torch.cat([p.expand(b, -1, -1, -1), k], dim=2) for p, k in zip(prefix.keys, self.keys)],
                           [torch.cat([p.expand(b, -1, -1, -1), v], dim=2) for p, v in zip(prefix.values, self.values)],
                           self.next_position, self.fingerprint, {k: v for k, v in self.meta.items() if k != "prefix_shared"})

    # ------------------------------------------------------------------ safetensors I/O

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            out[f"keys.{i}"] = k.detach().contiguous().cpu()
            out[f"values.{i}"] = v.detach().contiguous().cpu()
        return out

    def to_bytes(self) -> bytes:
        """The safetensors file's bytes (what :meth:`save` writes)."""
        tensors = self._tensors()
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fingerprint": self.fingerprint,
                    "next_position": str(self.next_position), "num_layers": str(len(self.keys)),
                    "meta": json.dumps(self.meta)}
        metadata["sha256"] = _digest(tensors, metadata)
        return st_save(tensors, metadata=metadata)

    def save(self, path: str | Path) -> None:
        """Write atomically to ``path`` (safetensors)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> "VisualCache":
        """Read a cache; any problem (truncated, edited, other format, other model) is one HTCError."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise HTCError(f"cannot read visual cache {path}: {e.strerror or e}") from e
        return cls.from_bytes(data, str(path), expected_fingerprint)

    @classmethod
    def from_bytes(cls, data: bytes, path: str = "this visual cache",
                   expected_fingerprint: str | None = None) -> "VisualCache":
        """:meth:`load` for bytes already read (``path`` names them in errors)."""
        try:
            tensors = st_load(data)
            metadata = _metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as e:
            raise HTCError(f"{path} is not a readable visual cache (truncated or corrupt): {e}") from e
        if metadata.get("format") != FORMAT:
            raise HTCError(f"{path} is not an htc-vlm visual cache (format {metadata.get('format')!r})")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise HTCError(f"{path} has cache format version {metadata.get('format_version')}; "
                           f"this htc-vlm reads version {FORMAT_VERSION}: compress the image again")
        if metadata.get("sha256") != _digest(tensors, metadata):
            raise HTCError(f"{path} was modified after it was written (checksum mismatch)")
        try:
            n = int(metadata["num_layers"])
            cache = cls([tensors[f"keys.{i}"] for i in range(n)], [tensors[f"values.{i}"] for i in range(n)],
                        int(metadata["next_position"]), metadata["fingerprint"], json.loads(metadata["meta"]))
        except (KeyError, ValueError, TypeError) as e:  # a consistent checksum over a malformed layout
            raise HTCError(f"{path} is not a well-formed visual cache ({type(e).__name__}: {e})") from e
        if expected_fingerprint is not None:
            cache.check(expected_fingerprint, str(path))
        return cache

    def check(self, fingerprint: str, name: str = "this visual cache") -> None:
        if self.fingerprint != fingerprint:
            raise HTCError(f"{name} was made by another model (fingerprint {self.fingerprint[:12]}, "
                           f"this model {fingerprint[:12]}): compress the image again with this model")


def _digest(tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes, bytes) and of every metadata field but itself."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})
