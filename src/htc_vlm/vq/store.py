"""The discrete feature store: q for every image, keyed by image id, in safetensors.

Training never reruns the tokenizer: ``htc-vlm encode-discrete`` writes the store once. A store
is one ``.safetensors`` file, or (when large) shards ``NAME-00001-of-00004.safetensors`` with an
index ``NAME.index.json`` mapping each image id to its shard. Each tensor is one image's quantized
latent, either flat (Q,) or shaped (C, h, w); the reader flattens in (C, h, w) order.

Features from another tokenizer, for example the official MGVQ ``encode()`` output of shape
32 x 21 x 21 per image, are accepted in the same format::

    from safetensors.torch import save_file
    save_file({"000000001234.jpg": q.reshape(32, 21, 21).contiguous(), ...}, "mgvq.safetensors",
              metadata={"format": "htc-vlm-discrete-features"})
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from ..errors import HTCError
from ..io import atomic_write_bytes

FORMAT = "htc-vlm-discrete-features"


def write_store(features: dict[str, torch.Tensor], path: str | Path, shard_size: int = 50_000,
                metadata: dict | None = None) -> list[Path]:
    """Write ``{image_id: q}`` to ``path`` (sharded beyond ``shard_size`` images), atomically per file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise HTCError(f"a feature store is a .safetensors file, got {path}")
    meta = {"format": FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    ids = sorted(features)
    if len(ids) <= shard_size:
        atomic_write_bytes(path, st_save({i: features[i].contiguous() for i in ids}, metadata=meta))
        return [path]
    n = -(-len(ids) // shard_size)
    index, written = {}, []
    for s in range(n):
        shard = path.with_name(f"{path.stem}-{s + 1:05d}-of-{n:05d}.safetensors")
        chunk = ids[s * shard_size:(s + 1) * shard_size]
        atomic_write_bytes(shard, st_save({i: features[i].contiguous() for i in chunk}, metadata=meta))
        index |= {i: shard.name for i in chunk}
        written.append(shard)
    index_path = path.with_name(f"{path.stem}.index.json")
    atomic_write_bytes(index_path, json.dumps({"metadata": meta, "weight_map": index}).encode())
    return written + [index_path]


class FeatureStore:
    """Read q by image id from a store file, or from a sharded store's index (or its base name)."""

    def __init__(self, path: str | Path, expected_dim: int | None = None):
        path = Path(path)
        index = path if path.name.endswith(".index.json") else path.with_name(f"{path.stem}.index.json")
        if index.exists():
            try:
                where = json.loads(index.read_text())["weight_map"]
                self._where = {i: index.parent / shard for i, shard in where.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise HTCError(f"{index} is not a feature-store index ({type(e).__name__}: {e})") from e
            files = sorted(set(self._where.values()))
            for f in files:  # shards live beside their index: never read a file named from elsewhere
                if f.parent.resolve() != index.parent.resolve():
                    raise HTCError(f"{index} names a shard outside its folder: {f}")
        elif path.exists():
            files = [path]
            self._where = None
        else:
            raise HTCError(f"feature store not found: {path}")
        self._files = {}
        for f in files:
            try:
                self._files[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise HTCError(f"cannot read feature store {f}: {e}") from e
        if self._where is None:
            self._where = {k: path for k in self._files[path].keys()}
        self.path = path
        self.dim = None
        if self._where:
            first = next(iter(self._where))
            self.dim = self[first].numel()
        if expected_dim is not None and self.dim is not None and self.dim != expected_dim:
            raise HTCError(f"{path} holds q of length {self.dim} but the model expects {expected_dim} "
                           f"(discrete_channels x discrete_grid^2 in its config)")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def ids(self) -> list[str]:
        return sorted(self._where)

    def __getitem__(self, image_id: str) -> torch.Tensor:
        """q of one image, flattened in (C, h, w) order: (Q,)."""
        if image_id not in self._where:
            raise HTCError(f"image id {image_id!r} is not in the feature store {self.path}")
        return self._files[self._where[image_id]].get_tensor(image_id).reshape(-1).float()

    def digest(self, image_ids) -> str:
        """SHA-256 of the q of ``image_ids`` (what a run read from this store), ids missing included."""
        h = hashlib.sha256()
        for i in sorted(set(image_ids)):
            h.update(i.encode() + b"\0")
            if i in self._where:
                h.update(self[i].numpy().tobytes())
        return h.hexdigest()

    def batch(self, image_ids: list[str]) -> torch.Tensor:
        return torch.stack([self[i] for i in image_ids])  # (B, Q)


def _batch_key(tokenizer_key: str, root: Path, files: list[Path]) -> str:
    """What a batch of q depends on: the tokenizer, and each file's path, size and modification time."""
    h = hashlib.sha256(tokenizer_key.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def encode_folder(tokenizer, images_dir: str | Path, batch_size: int = 64, progress=None,
                  work: str | Path | None = None, tokenizer_key: str = "",
                  aspect: str = "exact") -> tuple[dict, list[str]]:
    """q of every image below ``images_dir``, keyed by its path relative to the folder (the
    ``image`` field of LLaVA files). Returns the features and the files that failed, with why.
    ``aspect`` is the geometry of data/processor.py: ``exact`` refuses images of another size than
    the tokenizer's; ``pad`` / ``crop`` / ``resize`` bring any image to it as the model's tower sees it.

    With ``work``, each finished batch is kept there (one safetensors file, written atomically, keyed by
    ``tokenizer_key`` and its files' paths, sizes and times), and a batch found there with the same key
    is read instead of encoded again: a killed run, started again, resumes."""
    from ..data.images import image_under, list_images, load_rgb
    from ..data.processor import ImageProcessing

    root = Path(images_dir)
    files = list_images(root, recursive=True)
    features, failed = {}, []
    geometry = ImageProcessing(tokenizer.config.image_size, aspect)  # [-1, 1], the tokenizer's input
    for i in range(0, len(files), batch_size):
        batch = files[i:i + batch_size]
        done = None
        if work is not None:
            key = _batch_key(f"{tokenizer_key}:{aspect}", root, batch)
            done = Path(work) / f"batch-{i // batch_size:06d}.safetensors"
            kept = _read_batch(done, key)
            if kept is not None:
                features |= kept[0]
                failed += kept[1]
                if progress:
                    progress(len(batch))
                continue
        chunk, ids, bad = [], [], []
        for f in batch:
            try:
                image_under(root, f.relative_to(root).as_posix())  # a symlink pointing out is not read
                chunk.append(geometry.pixels([geometry.check(load_rgb(f), str(f))])[0])
                ids.append(f.relative_to(root).as_posix())
            except HTCError as e:
                bad.append(str(e))
        got = {}
        if chunk:
            q = tokenizer.q(torch.stack(chunk))  # (B, Q)
            got = {k: v.clone() for k, v in zip(ids, q)}
        if done is not None:
            atomic_write_bytes(done, st_save(got, metadata={"key": key, "failed": json.dumps(bad)}))
        features |= got
        failed += bad
        if progress:
            progress(len(batch))
    return features, failed


def _read_batch(path: Path, key: str) -> tuple[dict, list[str]] | None:
    """A batch kept by an earlier run, if it is whole and was made from the same inputs."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["failed"])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None  # not readable: encode it again
