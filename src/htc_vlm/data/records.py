"""The records of a LLaVA conversation file, checked once and then read without parsing the JSON again.

LLaVA-665k is a 1 GB JSON list: parsing it takes half a minute and keeps every record as Python
objects in every rank. A file over :data:`INDEX_BYTES` is parsed once, each record checked
(``check_record``), and a small index is written to a cache folder (each record's byte range in the
file, its image and word count, in safetensors); a later start with the same file (same size and
modification time) reads only the index, and each record is parsed from its bytes when used. The
image headers that passed their check are remembered there too, by file identity (size, time,
inode) and image processing, so a restart stats the images instead of opening them.

The cache folder is ``$HTC_VLM_CACHE`` or ``~/.cache/htc_vlm``, under ``records/<digest of the
file's path>``; it is written atomically and a stale or broken one is rebuilt.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import HTCError
from ..io import atomic_dir, atomic_write_bytes

INDEX_BYTES = 64 * 2**20  # files larger than this are indexed (the tiny lab's files stay in memory)
VERSION = 2


def cache_root() -> Path:
    return Path(os.environ.get("HTC_VLM_CACHE", Path.home() / ".cache" / "htc_vlm"))


_SPACE = re.compile(r"\s*")


def _decode_with_spans(text: str) -> tuple[list, np.ndarray]:
    """``json.loads`` of a JSON list, and each element's [start, end) range in bytes of its UTF-8."""
    dec, pos = json.JSONDecoder(), _SPACE.match(text, 0).end()
    if text[pos:pos + 1] != "[":
        return json.loads(text), np.zeros((0, 2), dtype=np.int64)  # not a list: the caller says so
    out, chars = [], []
    pos = _SPACE.match(text, pos + 1).end()
    while text[pos:pos + 1] != "]":
        obj, end = dec.raw_decode(text, pos)
        out.append(obj)
        chars.append((pos, end))
        pos = _SPACE.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = _SPACE.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    if text.isascii():  # bytes are characters
        return out, np.array(chars, dtype=np.int64).reshape(-1, 2)
    spans, done, nbytes = [], 0, 0  # character offsets to byte offsets, encoding each stretch once
    for a, b in chars:
        nbytes += len(text[done:a].encode())
        start = nbytes
        nbytes += len(text[a:b].encode())
        spans.append((start, nbytes))
        done = b
    return out, np.array(spans, dtype=np.int64).reshape(-1, 2)


def _words(rec: dict) -> int:
    return sum(len(t.get("value", "").split()) for t in rec["conversations"])


class Records(Sequence):
    """``records[i]`` is the i-th record (a dict); ``image_of[i]`` the index of its image in ``images``
    (-1: none), ``words[i]`` the words of its turns. ``check(rec, name)`` validates one record."""

    def __init__(self, path: str | Path, check: Callable[[dict, str], None], index_bytes: int | None = None):
        self.path = Path(path)
        try:
            st = self.path.stat()
        except OSError as e:
            raise HTCError(f"cannot read the conversation file {self.path}: {e.strerror or e}") from e
        self._source = {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "version": VERSION}
        self.cache: Path | None = None
        self._list: list[dict] | None = None
        self._fh, self._pid = None, None
        if st.st_size > (INDEX_BYTES if index_bytes is None else index_bytes):
            self.cache = cache_root() / "records" / hashlib.sha256(self._source["path"].encode()).hexdigest()[:16]
            if self._load_index():
                return
        gc_was = gc.isenabled()
        gc.disable()  # 665k fresh dicts would trigger full collections over and over
        try:
            self._build(check)
        finally:
            if gc_was:
                gc.enable()

    def _build(self, check) -> None:
        records, spans = self._parse(spans=self.cache is not None)
        for i, rec in enumerate(records):
            check(rec, f"{rec.get('id', i) if isinstance(rec, dict) else i!r} (record {i} of {self.path})")
        # (check raises on the first bad record, naming it; a record that is not an object included)
        names: dict[str, int] = {}
        self.image_of = np.array([names.setdefault(r["image"], len(names)) if "image" in r else -1 for r in records],
                                 dtype=np.int32)
        self.images = list(names)
        self.words = np.array([_words(r) for r in records], dtype=np.int32)
        if self.cache is None:
            self._list = records
        else:
            self.spans = spans
            self._write_index(records)

    # ------------------------------------------------------------------ reading

    def _parse(self, spans: bool = False) -> tuple[list, np.ndarray | None]:
        """The records, and with ``spans`` each one's [start, end) byte range in the file (the JSON
        list decoded element by element, so no second pass over the records is needed)."""
        try:
            raw = self.path.read_bytes()
            if not spans:
                records, ranges = json.loads(raw), None
            else:
                records, ranges = _decode_with_spans(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTCError(f"cannot read the conversation file {self.path}: {e}") from e
        if not isinstance(records, list):
            raise HTCError(f"{self.path} is not a JSON list of records")
        return records, ranges

    def __len__(self) -> int:
        return len(self.image_of)

    def __getitem__(self, i: int) -> dict:
        if self._list is not None:
            return self._list[i]
        if self._fh is None or self._pid != os.getpid():  # one handle per process (DataLoader workers)
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        start, end = self.spans[i]
        self._fh.seek(int(start))
        return json.loads(self._fh.read(int(end - start)))

    def __getstate__(self):  # a pickled dataset (spawned workers) reopens its own handle
        return {k: v for k, v in self.__dict__.items() if k != "_fh"} | {"_fh": None}

    # ------------------------------------------------------------------ the index

    def _load_index(self) -> bool:
        try:
            meta = json.loads((self.cache / "meta.json").read_text())
            if meta.get("source") != self._source:
                return False
            t = load_file(self.cache / "index.safetensors")
            self.spans, self.image_of, self.words = (t[k].numpy() for k in ("spans", "image_of", "words"))
            self.images = json.loads((self.cache / "images.json").read_text())
            return self.spans.shape == (len(self.image_of), 2) and len(self.words) == len(self.image_of)
        except Exception:  # noqa: BLE001 -- a stale or broken cache, whatever broke it, is rebuilt
            return False

    def _write_index(self, records: list[dict]) -> None:
        try:
            with atomic_dir(self.cache, overwrite=True) as tmp:
                save_file({"spans": torch.from_numpy(self.spans), "image_of": torch.from_numpy(self.image_of),
                           "words": torch.from_numpy(self.words)}, tmp / "index.safetensors")
                (tmp / "images.json").write_text(json.dumps(self.images))
                (tmp / "meta.json").write_text(json.dumps({"source": self._source}))
        except (OSError, HTCError):  # no writable cache: keep the records in memory
            self.cache, self._list = None, records

    # ------------------------------------------------------------------ image checks already passed

    def passed_images(self, key: str) -> dict[str, tuple]:
        """``{image: (size, mtime_ns, inode)}`` of the images that passed their check under ``key``."""
        if self.cache is None:
            return {}
        try:
            return {k: tuple(v) for k, v in json.loads((self.cache / f"passed-{key}.json").read_text()).items()}
        except (OSError, ValueError):
            return {}

    def remember_passed(self, key: str, passed: dict[str, tuple]) -> None:
        if self.cache is not None and self.cache.is_dir():
            try:
                atomic_write_bytes(self.cache / f"passed-{key}.json", json.dumps(passed).encode())
            except (OSError, HTCError):
                pass  # a cache that cannot be written only costs the next start its checks
