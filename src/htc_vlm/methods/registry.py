"""The method registry: each compression method of Tables 1-2 is one file in this package that
registers one :class:`Method`. Adding a method means adding a file and importing it in
``methods/__init__.py``.

Kinds:
- ``bound``: the upper and lower bounds (no training of their own);
- ``trained``: trained by ``htc-vlm train --method NAME`` (the ``compress`` stage from the upper
  bound); ``train_overrides(budget)`` gives the config keys that select it;
- ``training-free``: applied at inference to the upper-bound model.

``budget`` is the number of visual tokens the text (or, for voco methods, the KV cache) keeps:
1 in Table 1; 192 / 128 / 64 of 576 in Table 2 (the same fractions of the patches at tiny scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import HTCError
from .compression import Compression, register_compression


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # bound / trained / training-free
    paper: str  # where it comes from
    summary: str
    load: Callable[[Path, int | None, dict], object]  # (model folder, budget, options) -> model for eval
    train_overrides: Callable[[int], list[str]] | None = None  # budget -> key=value overrides (trained)
    tables: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)  # configurable defaults (training-free), documented
    label: str = ""  # the row label in the report's tables (the name where empty)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def in_table(table: str, kind: str) -> tuple[str, ...]:
    """The methods of ``kind`` that the paper's Table ``table`` lists, in registration order (the
    order of ``methods/__init__.py``, which is the order of the tables)."""
    return tuple(m.name for m in METHODS.values() if table in m.tables and m.kind == kind)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise HTCError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def parse_options(method: Method, pairs: list[str] | None) -> dict:
    """``["layer=2", ...]`` -> typed options of a training-free method; unknown keys are an error."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in method.options:
            known = ", ".join(method.options) or "none"
            raise HTCError(f"unknown option {pair!r} for method {method.name}; options: {known}")
        default = method.options[key]
        try:
            out[key] = tuple(int(x) for x in value.split(",") if x) if isinstance(default, tuple) else type(default)(value)
        except ValueError as e:
            raise HTCError(f"option {key} of {method.name} must be like {default!r}, got {value!r}") from e
    return out


def load_checkpoint(path: Path, **overrides):
    from ..modeling import HTCForConditionalGeneration

    if not Path(path).is_dir():
        raise HTCError(f"model folder not found: {path}")
    return HTCForConditionalGeneration.from_pretrained(path, **overrides)


def trained_loader(compression: str, budget_key: str) -> Callable:
    """Loader of a checkpoint trained as ``compression``; a given budget must match its token count."""

    def load(path: Path, budget: int | None, options: dict):
        model = load_checkpoint(path)
        c = model.config
        if c.compression != compression:  # the checkpoint's method against the one asked for
            raise HTCError(f"{path} was trained as compression={c.compression!r}, not {compression!r}; "
                           f"train it with `htc-vlm train --method {compression} ...`")
        if budget is not None and getattr(c, budget_key) != budget:
            raise HTCError(f"{path} keeps {getattr(c, budget_key)} visual tokens ({budget_key}), not the budget {budget}")
        return model

    return load


def trained_method(compression: Compression, tables: tuple[str, ...], paper: str, summary: str,
                   label: str = "") -> Method:
    """Register a method trained by the compress stage as ``model.compression=<name>``: its
    :class:`~htc_vlm.methods.compression.Compression` (what the model asks of it) and its
    :class:`Method` (how it is trained, loaded and listed), its token count set by
    ``model.<compression.budget_key>`` (``num_voco`` or ``pool_tokens``)."""
    name, budget_key = compression.name, compression.budget_key
    register_compression(compression)
    return register(Method(
        name=name, kind="trained", tables=tables, paper=paper, summary=summary, label=label,
        load=trained_loader(name, budget_key),
        train_overrides=lambda budget: [f"model.compression={name}", f"model.{budget_key}={budget}"],
    ))


def upper_bound(path: Path):
    """The uncompressed model at ``path`` (what the training-free methods and the lower bound start from)."""
    model = load_checkpoint(path)
    if not model.config.compression_spec.uncompressed:
        raise HTCError(f"{path} is compression={model.config.compression!r}; this method needs the uncompressed "
                       f"upper-bound model (the instruct stage's output)")
    return model
