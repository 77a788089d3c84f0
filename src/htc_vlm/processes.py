"""Commands run a few at a time, each in a process of its own (the benchmarks' ``--jobs``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .errors import HTCError


def side_by_side(jobs: list[tuple[str, list[str], Path]], n: int, env: dict | None = None,
                 say: Callable[[str], None] = print) -> None:
    """Run every ``(name, command, log)`` job, ``n`` at a time, each writing its output to its log.
    A job that exits non-zero stops the others (each job and what it started: a process group of its
    own) and raises :class:`HTCError` naming it and its log; Ctrl-C stops them all too. What the finished
    jobs wrote stays, so the caller may resume."""
    if n < 1:
        raise HTCError(f"--jobs must be at least 1, got {n}")
    todo, running = list(jobs), []  # running: (name, process, log)
    try:
        while todo or running:
            while todo and len(running) < n:
                name, cmd, log = todo.pop(0)
                say(f"{name}: started beside {len(running)} other(s) (log {log})")
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as f:
                    running.append((name, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                                           start_new_session=True), log))
            time.sleep(1)
            for job in [j for j in running if j[1].poll() is not None]:
                running.remove(job)
                if job[1].returncode:
                    raise HTCError(f"{job[0]} failed (log: {job[2]})")
                say(f"{job[0]}: done")
    except BaseException:  # a job's own children (a training it started) stop with it: its process group
        for _, other, _ in running:
            try:
                os.killpg(other.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise
