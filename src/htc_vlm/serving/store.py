"""Where a server keeps its visual caches: an in-memory LRU bounded in bytes, in front of an
optional folder of safetensors files (the format of ``htc-vlm compress``).

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
    folder: Path | None = None  # caches on disk (shared, survives restarts); None: memory only
    fingerprint: str = ""  # refuse files made by another model
    stats: StoreStats = field(default_factory=StoreStats)

    def __post_init__(self):
        self._lru: OrderedDict[str, VisualCache] = OrderedDict()
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder = Path(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> VisualCache | None:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                self.stats.hits += 1
                return self._lru[key]
        if self.folder is not None and self._path(key).is_file():
            try:
                cache = VisualCache.load(self._path(key), expected_fingerprint=self.fingerprint or None)
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
            cache.save(self._path(key))
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
        return self.folder is not None and self._path(key).is_file()


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
