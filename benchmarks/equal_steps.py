"""Table 1's trained one-token methods compared at the same number of training steps.

Up to session 32 ``htc-vlm reproduce`` stopped each compression run once its validation loss looked flat
(``training/plateau.py``; a run folder of that recipe still does), so the runs that Table 1 compares may have
trained for different numbers of steps (in the main job's run of session 31, HTC 1,500-2,000 and VoCo
2,400-3,000); today's preset trains each the same number of steps. This script trains each
Table 1 run of the given methods again from its seed's base, with that run's seed and data order, for
exactly ``--steps`` steps (no early stop; the preset's step cap by default), each on one thread as the
run's workers do (``--threads 2``: on two, other rounding, to check that a result is not one rounding's).
At the cap a run retraces the main job's run up to where that one stopped; at another step count the
warm-up (a share of the steps) differs. A run of the folder that already trained exactly that long (on
as many threads) is taken as it is. Every model is scored on each question family of the validation and
test splits; the script prints each run's scores; per split, each method's mean over seeds with its 95%
interval (Table 1 at equal steps, from the bootstrap over images and seeds that Table 1's intervals use),
and the paired difference of the first two methods with its interval and two-sided p.

    python benchmarks/equal_steps.py RUN [--methods htc voco] [--steps 3000] [--seeds 0 1 2] [--jobs 2]
        [--threads 1] [--set optim.lr_scheduler_type=cosine ...] [--out RUN/equal-steps]

``--set KEY=VALUE`` adds training overrides after the run's own (another schedule or learning rate for
every run, to choose a recipe on the validation split); with ``--set`` every run is trained again.

Each run trains and is scored in a process of its own on ``--threads`` threads (``OUT/<key>.log``);
``--jobs N`` runs N of them side by side. A finished run (``OUT/<key>/result.json``) is not trained or scored
again, so a stopped call resumes; a call with other steps, threads or overrides than those ``OUT/<key>``
was made with is refused (give it another ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from htc_vlm import machine, processes
from htc_vlm.errors import HTCError
from htc_vlm.reproduce import (FAMILY_BENCHMARKS, base_dir, compress_overrides, data_overrides, evaluate_families,
                               predictions, recorded_preset, seed_key, table1_methods)

SPLITS = ("val", "test")


def runs(run: Path, record: dict, methods: list[str], steps: int, seeds: list[int] | None = None,
         overrides: list[str] = (), threads: int = 1) -> list[dict]:
    """Every Table 1 run of ``methods`` (of ``seeds``, default all the run's): its key, seed, base and
    whether the run folder's own model trained exactly ``steps`` steps on ``threads`` threads with no
    ``overrides`` (then it is scored, not trained again)."""
    p = recorded_preset(record["preset"])
    if unknown := [m for m in methods if m not in table1_methods()]:
        raise SystemExit(f"not a trained method of Table 1: {', '.join(unknown)}; known: {', '.join(table1_methods())}")
    if missing := [s for s in seeds or () if s not in p.seeds]:
        raise SystemExit(f"the run has no Table 1 seed {', '.join(map(str, missing))}; its seeds: "
                         f"{', '.join(map(str, p.seeds))}")
    out = []
    for m in methods:
        for s in seeds or p.seeds:
            key = seed_key(m, s, p)
            stage = record["stages"].get(f"train/{key}", {})
            if stage.get("status") != "done":
                raise SystemExit(f"{run}: train/{key} is not done; finish the run first (htc-vlm reproduce)")
            curve = json.loads((run / "runs" / key / "model" / "val_curve.json").read_text())
            out.append({"key": key, "method": m, "seed": s, "init": base_dir(run, p, s) / "instruct" / "model",
                        "own": curve["final_step"] == steps and not overrides and stage.get("threads", 1) == threads})
    return out


def train_command(run: Path, record: dict, job: dict, out: Path, steps: int, overrides: list[str] = ()) -> list[str]:
    """``reproduce``'s command for this Table 1 run (``_train_experiment``), without its early stop, then
    ``overrides``."""
    p = recorded_preset(record["preset"])
    return ["htc-vlm", "train", "--config", "tiny", "--method", job["method"], "--budget", "1", f"output_dir={out}",
            *data_overrides(run), *compress_overrides(run, p, job["init"], job["seed"], steps, early_stop=False),
            *overrides]


def one(run: Path, record: dict, job: dict, out: Path, steps: int, overrides: list[str] = (), threads: int = 1) -> dict:
    """Train (unless the run's own model is that long) and score one run, on this process's threads."""
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(settings(steps, threads, overrides)) + "\n")
    model = run / "runs" / job["key"] / "model" if job["own"] else out / "model"
    curve_file, train_s = model / "val_curve.json", None
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else None
    if not curve or curve["final_step"] != steps:
        t0 = time.perf_counter()
        with open(out / "train.log", "w") as f:
            if subprocess.run(train_command(run, record, job, out, steps, overrides), stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"{job['key']}: training failed (log: {out / 'train.log'})")
        train_s = round(time.perf_counter() - t0, 1)
        curve = json.loads(curve_file.read_text())
    result = {"key": job["key"], "method": job["method"], "seed": job["seed"], "steps": curve["final_step"],
              "best_val_loss": round(min(curve["val_loss"]), 4), "model": str(model), "trained": not job["own"],
              "train_seconds": train_s, "overrides": list(overrides), "threads": threads}  # seconds None: trained before
    for split in SPLITS:
        got = evaluate_families(run, job["key"], model, "model", None, tuple(FAMILY_BENCHMARKS), split,
                                out=out / f"eval-{split}")
        result[split] = got["scores"]
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def settings(steps: int, threads: int, overrides: list[str]) -> dict:
    """What a run's folder under OUT is made with (``OUT/<key>/settings.json``)."""
    return {"steps": steps, "threads": threads, "overrides": list(overrides)}


def check_settings(out: Path, jobs: list[dict], made: dict) -> None:
    """Refuse to resume into a run folder made with other settings: its model or scores would be mixed in."""
    for j in jobs:
        f = out / j["key"] / "settings.json"
        if f.exists() and (was := json.loads(f.read_text())) != made:
            raise SystemExit(f"{out / j['key']} was made with {was}, not {made}; give this call another --out")


def side_by_side(run: Path, out: Path, jobs: list[dict], n: int, steps: int, console, overrides: list[str] = (),
                 threads: int = 1) -> None:
    """Each unfinished run in a process of its own (this script with ``--key``), ``n`` at a time,
    ``threads`` threads each; a failure stops the others (a rerun resumes what finished)."""
    env = dict(os.environ) | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    todo = [j for j in jobs if not (out / j["key"] / "result.json").exists()]
    try:
        processes.side_by_side([(j["key"], [sys.executable, __file__, str(run), "--methods", j["method"], "--seeds",
                                            str(j["seed"]), "--key", j["key"], "--steps", str(steps), "--out", str(out),
                                            "--threads", str(threads),
                                            *(a for o in overrides for a in ("--set", o))],
                                 out / f"{j['key']}.log")
                                for j in todo], n, env=env, say=lambda msg: console.print(msg, highlight=False))
    except HTCError as e:
        raise SystemExit(str(e)) from None


def statistics(run: Path, out: Path, jobs: list[dict], method: str, family: str, split: str) -> list:
    """Per seed, the per-image statistics of ``method``'s runs on one family of ``split``."""
    from htc_vlm.evaluation.bootstrap import image_statistics

    return [image_statistics(*predictions(run, out / j["key"] / f"eval-{split}", family, split))
            for j in jobs if j["method"] == method]


def table(run: Path, out: Path, jobs: list[dict], split: str) -> dict:
    """Per method and family: the mean over seeds and its 95% interval (bootstrap over images and seeds)."""
    from htc_vlm.evaluation.bootstrap import interval

    methods = dict.fromkeys(j["method"] for j in jobs)
    return {m: {f: interval(statistics(run, out, jobs, m, f, split)).to_dict() for f in FAMILY_BENCHMARKS}
            for m in methods}


def compare(run: Path, out: Path, jobs: list[dict], a: str, b: str, split: str) -> dict:
    """Per family: A - B over the same images of ``split`` (paired bootstrap over images and seeds)."""
    from htc_vlm.evaluation.bootstrap import paired_difference

    return {f: paired_difference(statistics(run, out, jobs, a, f, split), statistics(run, out, jobs, b, f, split))
            for f in FAMILY_BENCHMARKS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished htc-vlm reproduce run folder")
    ap.add_argument("--methods", nargs="+", default=["htc", "voco"],
                    help="Table 1's trained methods; the first two are compared")
    ap.add_argument("--steps", type=int, default=None, help="steps of every run (default: the preset's step cap)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="Table 1 seeds (default: all the run's)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained side by side")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of each run (the run's own workers train on one; 2: other rounding)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a training override added after the run's own (repeatable); every run is trained again")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--key", default=None, help=argparse.SUPPRESS)  # one run, in a worker process
    a = ap.parse_args(argv)
    if a.jobs < 1 or a.threads < 1:
        raise SystemExit(f"--jobs and --threads must be at least 1, got {a.jobs} and {a.threads}")
    record = json.loads((a.run / "run.json").read_text())
    p = recorded_preset(record["preset"])
    steps = a.steps or p.compress_max_steps
    if steps < p.compress_eval_steps:  # a run shorter than that has no validation loss to report
        raise SystemExit(f"--steps must be at least {p.compress_eval_steps} (the runs' evaluation interval), got {steps}")
    out = a.out or a.run / "equal-steps"
    if bad := [o for o in a.overrides if "=" not in o or o.startswith("=")]:
        raise SystemExit(f"--set takes KEY=VALUE, got {', '.join(map(repr, bad))}")
    jobs = runs(a.run, record, a.methods, steps, a.seeds, a.overrides, a.threads)
    check_settings(out, jobs, settings(steps, a.threads, a.overrides))
    if a.key:
        one(a.run, record, next(j for j in jobs if j["key"] == a.key), out / a.key, steps, a.overrides, a.threads)
        return
    console = Console(width=None if sys.stdout.isatty() else 140)  # a log file keeps whole rows
    side_by_side(a.run, out, jobs, a.jobs, steps, console, a.overrides, a.threads)
    results = [json.loads((out / j["key"] / "result.json").read_text()) for j in jobs]
    t = Table("run", "steps", "best val loss", "val open", "test open", "test POPE F1 r / p / a", "test MME",
              "test MC", "train s", title=f"Table 1's runs at {steps} steps each, {a.threads} thread(s)"
              + (f" with {' '.join(a.overrides)}" if a.overrides else ""))
    for r in results:
        te = r["test"]
        pope = " / ".join(f"{te[f'pope_{k}']:.1f}" for k in ("random", "popular", "adversarial"))
        t.add_row(r["key"], str(r["steps"]), f"{r['best_val_loss']:.4f}", f"{r['val']['open']:.1f}",
                  f"{te['open']:.1f}", pope, f"{te['mme']:.0f}", f"{te['mc']:.1f}",
                  "run's own" if not r["trained"] else "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}")
    console.print(t)
    summary = {"steps": steps, "threads": a.threads, "overrides": a.overrides, "machine": machine.describe(),
               "runs": results}
    for split in SPLITS:
        cells = summary[f"table_{split}"] = table(a.run, out, jobs, split)
        t = Table("method", *FAMILY_BENCHMARKS,
                  title=f"at {steps} steps, {split} split: mean over seeds [95% interval over images and seeds]")
        for m, fams in cells.items():
            t.add_row(m, *(f"{c['mean']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}]" for c in fams.values()))
        console.print(t)
    if len(a.methods) >= 2:
        x, y = a.methods[:2]
        for split in SPLITS:
            diff = compare(a.run, out, jobs, x, y, split)
            summary[f"{x}_minus_{y}_{split}"] = diff
            t = Table("family", f"{x} - {y}", "95% interval", "p (bootstrap)",
                      title=f"{x} - {y} at {steps} steps, {split} split (mean over seeds, paired over images)")
            for f, d in diff.items():
                t.add_row(f, f"{d['difference']:+.2f}", f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]",
                          f"{d['p_bootstrap']:.3f}")
            console.print(t)
    (out / "equal_steps.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
