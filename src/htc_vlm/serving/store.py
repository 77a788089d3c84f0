"""Where a server keeps its visual caches: an in-memory LRU bounded in bytes, in front of an
optional folder of safetensors files (the format of ``htc-vlm compress``): a local path, or any
fsspec URL (``s3://bucket/caches``, ``gs://...``, ``memory://...``) so that replicas share one store.

Keys are ``<image content hash>-<maker>`` (the maker is the model fingerprint and template prefix, as
in :func:`htc_vlm.inference.cache_path`), so a cache can never be served for another image, model or
template. Several server processes may share one folder: files are written atomically and a file
that does not load (a broken or foreign cache) counts as a miss.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import VisualCache
from ..errors import HTCError
from ..io import atomic_write_bytes


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


@dataclass
class CacheStore:
    memory_bytes: int  # the LRU's budget; 0 keeps nothing in memory
    folder: str | Path | None = None  # a path or an fsspec URL (shared, survives restarts); None: memory only
    fingerprint: str = ""  # refuse files made by another model
    stats: StoreStats = field(default_factory=StoreStats)

    def __post_init__(self):
        self._lru: OrderedDict[str, VisualCache] = OrderedDict()
        self._lock = threading.Lock()
        self._fs = None
        if self.folder is not None and "://" in str(self.folder):
            try:
                import fsspec
            except ImportError as e:
                raise HTCError(f"a cache URL ({self.folder}) needs fsspec: pip install fsspec (and s3fs for s3://)") from e
            try:
                self._fs, self._root = fsspec.core.url_to_fs(str(self.folder))
                self._fs.makedirs(self._root, exist_ok=True)
            except (ImportError, ValueError, OSError) as e:
                raise HTCError(f"cannot open the cache store {self.folder}: {e}") from e
        elif self.folder is not None:
            self.folder = Path(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return Path(self.folder) / f"{key}.safetensors"

    def _read(self, key: str) -> bytes | None:
        if self.folder is None:
            return None
        try:
            if self._fs is not None:
                return self._fs.cat_file(f"{self._root}/{key}.safetensors")
            return self._path(key).read_bytes()
        except (FileNotFoundError, OSError):
            return None

    def _write(self, key: str, data: bytes) -> None:
        if self._fs is not None:  # object stores replace an object whole; other file systems via a rename
            tmp = f"{self._root}/.{key}.{threading.get_ident()}.tmp"
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, f"{self._root}/{key}.safetensors")
        elif self.folder is not None:
            atomic_write_bytes(self._path(key), data)

    def _exists(self, key: str) -> bool:
        if self._fs is not None:
            return self._fs.exists(f"{self._root}/{key}.safetensors")
        return self.folder is not None and self._path(key).is_file()

    def get(self, key: str) -> VisualCache | None:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                self.stats.hits += 1
                return self._lru[key]
        data = self._read(key)
        if data is not None:
            try:
                cache = VisualCache.from_bytes(data, f"cache {key}", self.fingerprint or None)
            except HTCError:
                cache = None  # broken or foreign: made again by the caller
            if cache is not None:
                self._remember(key, cache)
                with self._lock:
                    self.stats.hits += 1
                return cache
        with self._lock:
            self.stats.misses += 1
        return None

    def put(self, key: str, cache: VisualCache) -> None:
        if self.folder is not None:
            self._write(key, cache.to_bytes())
        self._remember(key, cache)

    def _remember(self, key: str, cache: VisualCache) -> None:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return
            if cache.nbytes > self.memory_bytes:
                return
            self._lru[key] = cache
            self.stats.bytes += cache.nbytes
            while self.stats.bytes > self.memory_bytes:
                _, old = self._lru.popitem(last=False)
                self.stats.bytes -= old.nbytes
                self.stats.evictions += 1
            self.stats.entries = len(self._lru)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._lru:
                return True
        return self._exists(key)


def parse_bytes(text: str) -> int:
    """``2GB``, ``512MB``, ``100k``, ``1048576`` -> bytes (powers of 1024)."""
    units = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
    t = str(text).strip().lower()
    num = t.rstrip("kmgb")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise HTCError(f"not a size: {text!r} (e.g. 2GB, 512MB)") from None
    if unit not in units or value < 0:
        raise HTCError(f"not a size: {text!r} (e.g. 2GB, 512MB)")
    return int(value * units[unit])
