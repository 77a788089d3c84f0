"""Compression methods by name: one file each, registered in :mod:`.registry` (see its docstring).

``load_for_method(folder, name, budget)`` gives what the evaluator runs: an
:class:`~htc_vlm.HTCForConditionalGeneration` (bounds and trained methods, answered by compressing
each image once) or a question-aware wrapper (training-free methods, image and question together).
``model`` runs a folder as it was trained, whatever its compression.
"""

from __future__ import annotations

from pathlib import Path

# Importing a method file registers it; this order is the order of the tables.
from . import upper, lower, avgpool, qformer, voco, htc, discrete  # noqa: F401, I001  (Table 1)
from . import fastv, pdrop, sparsevlm, tome  # noqa: F401, E402  (Table 2, training-free)
from ..errors import HTCError
from .registry import METHODS, Method, get_method, load_checkpoint, parse_options

__all__ = ["METHODS", "Method", "get_method", "load_for_method", "parse_options"]


def load_for_method(path: str | Path, method: str, budget: int | None = None, options: dict | None = None):
    if method == "model":
        if budget is not None or options:
            raise HTCError("method 'model' runs a folder as trained; budget and options belong to a named method")
        return load_checkpoint(Path(path)).eval()
    return get_method(method).load(Path(path), budget, options or {}).eval()
