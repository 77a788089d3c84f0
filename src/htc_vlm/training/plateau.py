"""Run until the validation loss has flattened.

A compression run evaluates its loss on the validation conversations every ``optim.eval_steps`` steps
and stops once the curve is flat: the best validation loss of the last ``window`` share of the steps
run so far improved on the best loss before that window by less than ``tolerance`` (relative). The
same test, :func:`is_flat`, is applied to every finished run by the report, so a run that hit its
``max_steps`` cap still improving is flagged instead of passing for converged.
"""

from __future__ import annotations

from transformers import TrainerCallback

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


def is_flat(curve: list[tuple[int, float]], tolerance: float = FLAT_TOLERANCE, window: float = 0.2) -> bool:
    gain = relative_gain(curve, window)
    return gain is not None and gain < tolerance


class StopWhenFlat(TrainerCallback):
    """Ends training at the first evaluation where :func:`is_flat` holds (and ``min_steps`` are done)."""

    def __init__(self, tolerance: float, window: float, min_steps: int = 0):
        self.tolerance, self.window, self.min_steps = tolerance, window, min_steps

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        curve = val_curve(state.log_history)
        if state.global_step >= self.min_steps and is_flat(curve, self.tolerance, self.window):
            control.should_training_stop = True
        return control
