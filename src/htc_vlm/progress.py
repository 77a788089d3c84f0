"""How far a running stage of ``htc-vlm reproduce`` has got, and the live display that shows it.

A stage runs in the scheduler's process or in a worker process, with its own output sent to its log
file, so it cannot draw on the terminal. Instead it writes a small JSON file (steps done, steps in
all, the last loss or the question family) to the path in ``$HTC_VLM_PROGRESS``, at most twice a
second, atomically; :class:`ProgressCallback` does so for the HF Trainer and :func:`report` for the
evaluations. The scheduler reads these files into :class:`LiveStatus`: the stages done, running
and left, a bar per running stage with its loss and ETA, refreshed on the terminal by ``rich``.
Without the variable nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from .io import atomic_write_bytes

ENV = "HTC_VLM_PROGRESS"
_EVERY_S = 0.5
_last = {"t": 0.0}


def report(done: int, total: int | None, force: bool = False, **fields) -> None:
    """Write ``done`` of ``total`` (and ``fields``) to ``$HTC_VLM_PROGRESS``; a no-op without it."""
    path = os.environ.get(ENV)
    now = time.monotonic()
    if not path or (not force and now - _last["t"] < _EVERY_S):
        return
    _last["t"] = now
    atomic_write_bytes(Path(path), json.dumps({"done": done, "total": total, "time": time.time(), **fields}).encode())


def read(path: Path) -> dict | None:
    """A progress file's content, or None (not written yet, or caught between writes)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ProgressCallback(TrainerCallback):
    """The Trainer's step, its step count and its last logged loss, to :func:`report`."""

    def __init__(self):
        self.loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            report(state.global_step, state.max_steps or None, force=state.global_step == state.max_steps,
                   loss=self.loss)


class LiveStatus:
    """A ``rich`` renderable of the run: one line of counts, then each running stage with a bar,
    its steps, loss (or question family) and the time left at its rate so far. Read afresh at every
    refresh from the stages' progress files."""

    def __init__(self, total: int, t_start: float):
        self.total, self.t_start = total, t_start
        self.done = 0
        self.running: dict[str, tuple[Path, float]] = {}  # stage -> (progress file, wall-clock start)

    def start(self, name: str, progress_file: Path) -> None:
        self.running[name] = (progress_file, time.time())

    def finish(self, name: str) -> None:
        self.running.pop(name, None)
        self.done += 1

    def rows(self) -> list[tuple[str, float | None, str]]:
        """(stage, fraction done or None, what to print after the bar) per running stage."""
        out = []
        for name, (path, t0) in self.running.items():
            p = read(path) or {}
            done, total = p.get("done"), p.get("total")
            frac = done / total if done is not None and total else None
            parts = [f"{done}/{total}" if frac is not None else "starting"]
            if p.get("loss") is not None:
                parts.append(f"loss {p['loss']:.3f}")
            if p.get("family"):
                parts.append(p["family"])
            if frac and p.get("time"):
                parts.append(f"{(p['time'] - t0) * (1 - frac) / frac / 60:.1f} min left")
            out.append((name, frac, ", ".join(parts)))
        return out

    def __rich__(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        left = self.total - self.done - len(self.running)
        head = (f"stages: {self.done} done, {len(self.running)} running, {left} left  "
                f"({(time.perf_counter() - self.t_start) / 60:.1f} min so far)")
        table = Table.grid(padding=(0, 1))
        for name, frac, text in self.rows():
            bar = ProgressBar(total=1.0, completed=frac or 0.0, width=30, pulse=frac is None)
            table.add_row(name, bar, text)
        return Group(head, table)
