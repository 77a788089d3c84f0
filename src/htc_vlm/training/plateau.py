"""Run until the validation loss has flattened.

A compression run evaluates its loss on the validation conversations every ``optim.eval_steps`` steps
and stops once the curve is flat: the best validation loss of the last ``window`` share of the steps
run so far improved on the best loss before that window by less than ``tolerance`` (relative). The
same test, :func:`is_flat`, is applied to every finished run by the report, so a run that hit its
``max_steps`` cap still improving is flagged instead of passing for converged.

The best-loss test reads noise: on the embedded default one evaluation moves 1-4% from the next at a
constant rate, more than the 1% it tests for, so a run "flattens" on a lucky dip (docs/LOG.md,
sessions 7 and 11). :func:`trend_gain` is the second opinion the report prints beside it: the
improvement over the same window predicted by a least-squares line through the later evaluations,
with its standard error, so a reader sees which runs were still falling when they stopped.

Plain functions of a curve, with no transformers import (the report reads them); the Trainer
callback that applies the stop rule, ``StopWhenFlat``, is in training/run.py.
"""

from __future__ import annotations

FLAT_TOLERANCE = 0.01  # the rule: less than 1% relative improvement over the last 20% of the steps


def val_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, validation loss) pairs from a Trainer's ``state.log_history``."""
    return [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e]


def relative_gain(curve: list[tuple[int, float]], window: float) -> float | None:
    """How much the best loss improved over the last ``window`` share of the steps, relative to the best
    loss before it; None while fewer than two evaluations precede the window."""
    if not curve:
        return None
    start = curve[-1][0] * (1 - window)
    before = [loss for step, loss in curve if step <= start]
    if len(before) < 2:
        return None
    best_before, best_now = min(before), min(loss for _, loss in curve)
    return (best_before - best_now) / best_before


def trend_gain(curve: list[tuple[int, float]], window: float = 0.2, span: float | None = None
               ) -> tuple[float, float] | None:
    """(gain, standard error): the relative improvement over the last ``window`` share of the steps that a
    least-squares line through the evaluations of the last ``span`` share (default twice the window)
    predicts, relative to their mean loss. None with fewer than four evaluations in the span."""
    if not curve:
        return None
    last = curve[-1][0]
    start = last * (1 - (span if span is not None else 2 * window))
    pts = [(float(s), float(v)) for s, v in curve if s >= start]
    if len(pts) < 4:
        return None
    n = len(pts)
    mx, my = sum(s for s, _ in pts) / n, sum(v for _, v in pts) / n
    sxx = sum((s - mx) ** 2 for s, _ in pts)
    if sxx == 0:
        return None
    slope = sum((s - mx) * (v - my) for s, v in pts) / sxx
    resid = sum((v - my - slope * (s - mx)) ** 2 for s, v in pts)
    se = (resid / (n - 2) / sxx) ** 0.5
    scale = window * last / my
    return -slope * scale, se * scale


def is_falling(trend: tuple[float, float] | None, tolerance: float = FLAT_TOLERANCE) -> bool:
    """Whether a :func:`trend_gain` result resolves a gain above ``tolerance``: by two standard errors."""
    return trend is not None and trend[0] - 2 * trend[1] > tolerance


def is_flat(curve: list[tuple[int, float]], tolerance: float = FLAT_TOLERANCE, window: float = 0.2) -> bool:
    gain = relative_gain(curve, window)
    return gain is not None and gain < tolerance
