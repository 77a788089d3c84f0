"""The staged pipeline behind ``htc-vlm reproduce``.

Each stage writes into its own folder of the run and is recorded in ``run.json`` when it finishes,
so running the command again skips finished stages and resumes at the one in progress. A run
folder belongs to one preset and one set of options: another preset is refused with a message.

Stages are registered in order in :data:`STAGES`; later issues (training, evaluation, analysis)
add theirs. The report lists each finished stage with its outputs and the command behind them.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import HTCError
from .io import atomic_dir, atomic_write_bytes


@dataclass(frozen=True)
class RunPreset:
    name: str
    image_size: int
    train_scenes: int
    test_scenes: int
    seed: int = 0


PRESETS = {
    "tiny": RunPreset("tiny", image_size=64, train_scenes=2000, test_scenes=500),
    "tiny-quick": RunPreset("tiny-quick", image_size=64, train_scenes=300, test_scenes=100),
}


def get_preset(name: str, quick: bool) -> RunPreset:
    key = f"{name}-quick" if quick else name
    if key not in PRESETS:
        raise HTCError(f"unknown preset {name!r}{' with --quick' if quick else ''}; known: "
                       + ", ".join(sorted(p for p in PRESETS if not p.endswith("-quick"))))
    return PRESETS[key]


@dataclass
class Stage:
    name: str
    run: Callable[[Path, RunPreset], dict]  # (run folder, preset) -> summary for the report
    help: str


def _stage_scenes(root: Path, preset: RunPreset) -> dict:
    from .data.scenes import write_benchmark
    from .data.tokenizer import save_tokenizer

    with atomic_dir(root / "scenes", overwrite=True) as tmp:
        meta = write_benchmark(tmp, preset.train_scenes, preset.test_scenes, preset.seed, preset.image_size)
        save_tokenizer(tmp / "tokenizer")
    cmd = (f"htc-vlm data scenes --out {root / 'scenes'} --train {preset.train_scenes} "
           f"--test {preset.test_scenes} --seed {preset.seed} --size {preset.image_size}")
    return {"outputs": str(root / "scenes"), "command": cmd, "questions": meta["questions"]}


STAGES: list[Stage] = [
    Stage("scenes", _stage_scenes, "generate the scene benchmark and the embedded tokenizer"),
]


def run(out: Path, preset: str = "tiny", quick: bool = False, only: list[str] | None = None, console=None) -> dict:
    """Run (or resume) every stage of ``preset`` into ``out``; return the run record."""
    p = get_preset(preset, quick)
    names = [s.name for s in STAGES]
    for n in only or []:
        if n not in names:
            raise HTCError(f"unknown stage {n!r}; stages: {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "run.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"preset": asdict(p), "stages": {}}
    if record["preset"] != asdict(p):
        raise HTCError(f"{out} holds a run of preset {record['preset']['name']!r} with other settings; "
                       f"resume it with the same options, or start fresh with another --out or after deleting {out}")

    def save():
        atomic_write_bytes(record_path, (json.dumps(record, indent=1) + "\n").encode())

    for i, stage in enumerate(STAGES, 1):
        state = record["stages"].get(stage.name, {})
        if (only and stage.name not in only) or state.get("status") == "done":
            _say(console, f"[{i}/{len(STAGES)}] {stage.name}: {'skipped' if only and stage.name not in only else 'done already'}")
            continue
        _say(console, f"[{i}/{len(STAGES)}] {stage.name}: {stage.help}")
        t0 = time.perf_counter()
        try:
            summary = stage.run(out, p)
        except Exception as e:
            record["stages"][stage.name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc()}
            save()
            _write_report(out, record)
            raise
        record["stages"][stage.name] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2), **summary}
        save()
    _write_report(out, record)
    _say(console, f"report: {out / 'report.md'}")
    return record


def _write_report(out: Path, record: dict) -> None:
    lines = [f"# htc-vlm reproduce: preset {record['preset']['name']}", "",
             "| stage | status | seconds | outputs | command |", "|---|---|---|---|---|"]
    for name, s in record["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {s.get('outputs', '')} | "
                     f"`{s.get('command', '')}` |" if s["status"] == "done" else f"| {name} | failed: {s['error']} | | | |")
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(out / "results.json", (json.dumps(record, indent=1) + "\n").encode())


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False)
