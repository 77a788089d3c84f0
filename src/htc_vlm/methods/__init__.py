"""Compression methods by name (the registry grows with the baselines of the paper's Tables 1-2).

A method says how a trained model folder is run: ``model`` runs it as trained; ``lower`` is
VoCo-LLaMA's lower bound (an uncompressed model evaluated under the voco mask, with its untrained
voco token). Unknown names are an error listing the known ones.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HTCError
from ..modeling import HTCForConditionalGeneration


def _as_trained(path: Path) -> HTCForConditionalGeneration:
    return HTCForConditionalGeneration.from_pretrained(path)


def _lower_bound(path: Path) -> HTCForConditionalGeneration:
    model = HTCForConditionalGeneration.from_pretrained(path)
    if model.config.compresses:
        raise HTCError(f"the lower bound is an uncompressed model under the voco mask; {path} is "
                       f"compression={model.config.compression!r}")
    return HTCForConditionalGeneration.from_pretrained(path, compression="voco")


METHODS = {"model": _as_trained, "lower": _lower_bound}


def load_for_method(path: str | Path, method: str) -> HTCForConditionalGeneration:
    if method not in METHODS:
        raise HTCError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method](Path(path)).eval()
