"""Does the embedded default's upper bound learn on every seed and every machine?

Trains the base model's align and instruct stages (and instruct-letter, where the run has one) again
from a finished run's scenes and vision tower (``htc-vlm reproduce`` made them) for each configuration
given: a training seed, and a thread count (one thread rounds differently from two, as another machine
would). Each configuration's scores are printed side by side, with the time taken, in two tables: the
validation split (where a recipe is chosen) and the test split (the claim); each gives open accuracy,
POPE F1 (random / popular / adversarial), MME perception (of 1,200) and MC circular accuracy.

    python benchmarks/base_robustness.py RUN [--seeds 1 2] [--one-thread-seed 0] [--out RUN/robustness]
        [--jobs 2] [--compress voco htc] [--compress-steps 3000]

The run's own upper bound (seed 0, trained by ``reproduce`` with all cores) is the first row. A seed in
``--seeds`` whose base ``reproduce --seeds`` already trained in the run folder (``bases/sN``, all cores,
the same recipe) is not trained again: that base is scored on both splits.

``--compress METHOD ...`` also trains each method from every configuration's base (the run's own
included): the ``compress`` stage of the preset, seed 0, one thread, ``--compress-steps`` steps at
its constant rate with no early stop, the validation loss every 100 steps on 96 validation images;
then each is scored on the validation split's open questions. The second table shows how far a
one-token run moves with the base it compresses (docs/LOG.md, session 7).

Configurations run one after another (a one-thread configuration uses one thread; the others all the
machine's). ``--jobs N`` first trains and scores the one-thread configurations N at a time, each in its
own process (``OUT/seedS-1thread.log``), so two cores train two one-thread bases at once; each gives
the scores it gives alone, since it computes on one thread either way. Finished configurations are
skipped when run again (each writes ``result.json``).
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

from htc_vlm import processes
from htc_vlm.data.scenes import WITHOUT_LOOKUPS
from htc_vlm.errors import HTCError
from htc_vlm.reproduce import FAMILY_BENCHMARKS as FAMILIES
from htc_vlm.reproduce import (InstructStage, align_conversations, base_stage, evaluate_families, instruct_stages,
                               recorded_preset)


def plan(preset: dict) -> tuple[InstructStage, ...]:
    """The run's instruct stages after align (reproduce.instruct_stages)."""
    return instruct_stages(recorded_preset(preset))


def base_stages(record: dict, seed: int) -> list[str]:
    """The run's stages of seed ``seed``'s base, align first (``reproduce.base_stage``)."""
    p = recorded_preset(record["preset"])
    return [base_stage(p, seed, "align"), *(base_stage(p, seed, st.name) for st in plan(record["preset"]))]


def run_base(run: Path, record: dict, seed: int) -> tuple[Path, float] | None:
    """The base ``reproduce --seeds`` trained for ``seed`` in the run folder, all cores, the same recipe
    (its folder and training seconds), once all its stages are done; else None."""
    names, stages = base_stages(record, seed), record["stages"]
    if names[0] == "align":  # the run's own row (its preset seed), or a run with one base for every seed
        return None
    if any(stages.get(n, {}).get("status") != "done" for n in names):
        return None
    return run / Path(names[-1]).parent, sum(stages[n]["seconds"] for n in names)


def scores(run: Path, model: Path, out: Path, threads: int | None) -> dict:
    """The upper bound ``model`` on every family of the val and test splits (outputs in out/eval-SPLIT),
    on ``threads`` threads (default: as this process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return {f"{split}_{fam}": score for split in ("val", "test")
                for fam, score in evaluate_families(run, f"{out.name}-{split}", model, "upper", None, tuple(FAMILIES),
                                                    split, out=out / f"eval-{split}")["scores"].items()}
    finally:
        torch.set_num_threads(before)


def _run(cmd: list[str], log: Path, threads: int | None) -> None:
    env = dict(os.environ)
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
            raise SystemExit(f"failed: {' '.join(cmd)} (log: {log})")


def configuration(run: Path, out: Path, seed: int, threads: int | None, preset: dict,
                  reuse: tuple[Path, float] | None = None) -> dict:
    """Train (or, with ``reuse``, take the run's own) base for one configuration and score it."""
    done = out / "result.json"
    if done.exists() and "val_mc" in (old := json.loads(done.read_text())):  # older results scored fewer families
        return old
    out.mkdir(parents=True, exist_ok=True)
    if reuse:
        base, train_s = reuse
        result = {"seed": seed, "threads": "run's own", "train_seconds": round(train_s, 1), "base": str(base)}
    else:
        base, sc = out, run / "scenes"
        common = [f"data.images={sc / 'images'}", f"data.tokenizer={sc / 'tokenizer'}", f"optim.seed={seed}"]
        align = sc / "train" / align_conversations(recorded_preset(preset))
        t0 = time.perf_counter()
        _run(["htc-vlm", "train", "--config", "tiny", "stage=align", f"output_dir={out / 'align'}",
              f"model.vision_tower={run / 'vision' / 'model'}", f"data.conversations={align}",
              f"optim.num_train_epochs={preset['align_epochs']}", *common], out / "align.log", threads)
        for st in plan(preset):
            _run(["htc-vlm", "train", "--config", "tiny", "stage=instruct", f"output_dir={out / st.name}",
                  f"model.init={out / st.init / 'model'}", f"data.conversations={sc / 'train' / st.conversations}",
                  f"optim.num_train_epochs={st.epochs}", *st.overrides, *common], out / f"{st.name}.log", threads)
        result = {"seed": seed, "threads": threads or os.cpu_count(),
                  "train_seconds": round(time.perf_counter() - t0, 1)}
    result |= scores(run, base / "instruct" / "model", out, threads)
    done.write_text(json.dumps(result) + "\n")
    return result


def compression(run: Path, base: Path, out: Path, method: str, steps: int) -> dict:
    """``method`` trained from the upper bound in ``base`` for ``steps`` steps, scored on val open."""
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    sc = run / "scenes"
    t0 = time.perf_counter()
    conv = WITHOUT_LOOKUPS if (sc / "train" / WITHOUT_LOOKUPS).exists() else "conversations.json"  # as reproduce's
    _run(["htc-vlm", "train", "--config", "tiny", "--method", method, "--budget", "1", f"output_dir={out}",
          f"data.images={sc / 'images'}", f"data.tokenizer={sc / 'tokenizer'}",
          f"data.features={run / 'features.safetensors'}", f"model.init={base / 'instruct' / 'model'}",
          f"data.conversations={sc / 'train' / conv}",
          f"data.val_conversations={sc / 'val' / conv}", "data.val_items=96",
          f"optim.max_steps={steps}", "optim.eval_steps=100", "optim.seed=0"], out / "train.log", 1)
    train_s = time.perf_counter() - t0
    from htc_vlm import HTCConfig

    needs_q = HTCConfig.from_pretrained(out / "model").needs_latents  # the method says, not its name
    features = ["--features", str(run / "features.safetensors")] if needs_q else []
    _run(["htc-vlm", "eval", "--model", str(out / "model"), "--benchmark", "scenes_open", "--questions",
          str(sc / "val" / "open.jsonl"), "--images", str(sc / "images"), "--out", str(out / "eval-val"),
          *features], out / "eval-val.log", 1)
    curve = json.loads((out / "model" / "val_curve.json").read_text())
    result = {"method": method, "steps": steps, "best_val_loss": round(min(curve["val_loss"]), 4),
              "val_open": round(json.loads((out / "eval-val" / "metrics.json").read_text())["scores"]["scenes_open"], 2),
              "train_seconds": round(train_s, 1)}
    done.write_text(json.dumps(result) + "\n")
    return result


def side_by_side(run: Path, out: Path, seeds: list[int], jobs: int, console) -> None:
    """Train and score the one-thread configurations of ``seeds`` ``jobs`` at a time, each by this script
    in a process of its own; a finished one (``result.json``) is not started again."""
    todo = [s for s in seeds if not (out / f"seed{s}-1thread" / "result.json").exists()]
    try:
        processes.side_by_side([(f"seed{s}-1thread", [sys.executable, __file__, str(run), "--seeds", "--one-thread-seed",
                                                      str(s), "--out", str(out)], out / f"seed{s}-1thread.log")
                                for s in todo], jobs, say=lambda msg: console.print(msg, highlight=False))
    except HTCError as e:  # one failed: the others were stopped (a rerun resumes what finished)
        raise SystemExit(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a htc-vlm reproduce run folder (scenes and vision stages done)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2],
                    help="seeds trained again with all cores (the run's own seed-0 model is a row already)")
    ap.add_argument("--one-thread-seed", type=int, nargs="*", default=[0],
                    help="seeds also trained with one thread (none: --one-thread-seed with no value)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="one-thread configurations trained side by side")
    ap.add_argument("--compress", nargs="*", default=[], help="trained methods to compress every base with")
    ap.add_argument("--compress-steps", type=int, default=3000)
    a = ap.parse_args(argv)
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {a.jobs}")
    record = json.loads((a.run / "run.json").read_text())
    for stage in ("scenes", "vision"):
        if record["stages"].get(stage, {}).get("status") != "done":
            raise SystemExit(f"{a.run}: the {stage} stage is not done; run htc-vlm reproduce --only {stage} first")
    out = a.out or a.run / "robustness"
    configs = [(s, None) for s in a.seeds] + [(s, 1) for s in a.one_thread_seed]
    console = Console()
    if a.jobs > 1:
        side_by_side(a.run, out, a.one_thread_seed, a.jobs, console)
    rows, bases = [], {"run's own": a.run}
    own_val, own_test = (record["stages"].get(k, {}) for k in ("val/upper", "eval/upper"))
    if own_val.get("status") == own_test.get("status") == "done":  # the run's own upper bound is one more row
        rows.append({"seed": record["preset"]["seed"], "threads": "run's own",
                     **{f"{split}_{f}": got["scores"][f] for split, got in (("val", own_val), ("test", own_test))
                        for f in FAMILIES},
                     "train_seconds": sum(record["stages"][k]["seconds"]
                                          for k in base_stages(record, record["preset"]["seed"]))})
    for seed, threads in configs:
        name = f"seed{seed}" + ("-1thread" if threads == 1 else "")
        reuse = None if threads else run_base(a.run, record, seed)
        what = (f"the run's own base ({reuse[0].relative_to(a.run)})" if reuse else
                f"align + {' + '.join(st.name for st in plan(record['preset']))}")
        console.print(f"{name}: {what} + evaluation ...", highlight=False)
        rows.append(configuration(a.run, out / name, seed, threads, record["preset"], reuse))
        bases[name] = Path(rows[-1].get("base", out / name))
    for split, why in (("val", "the split recipes are chosen on"), ("test", "the claim")):
        t = Table("seed", "threads", "open %", "POPE F1 r / p / a", "MME", "MC circ. %", "train s",
                  title=f"upper bound of the embedded default, {split} split ({why})")
        for r in rows:
            pope = " / ".join(f"{r[f'{split}_pope_{k}']:.1f}" for k in ("random", "popular", "adversarial"))
            t.add_row(str(r["seed"]), str(r["threads"]), f"{r[f'{split}_open']:.1f}", pope,
                      f"{r[f'{split}_mme']:.0f}", f"{r[f'{split}_mc']:.1f}", f"{r['train_seconds']:.0f}")
        console.print(t)
    vals = [r["test_open"] for r in rows]
    console.print(f"test open accuracy over {len(rows)} configurations: min {min(vals):.1f}, max {max(vals):.1f}, "
                  f"mean {sum(vals) / len(vals):.1f}", highlight=False)
    out.mkdir(parents=True, exist_ok=True)  # no configuration may have made it (only the run's own base)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    if not a.compress:
        return
    crows = []
    for name, base in bases.items():
        for m in a.compress:
            console.print(f"{m} from the {name} base: {a.compress_steps} compression steps + evaluation ...",
                          highlight=False)
            where = out / "compress" / f"{name.replace(' ', '-').replace(chr(39), '')}-{m}"
            crows.append({"base": name} | compression(a.run, base, where, m, a.compress_steps))
    t = Table("base", "method", "steps", "best val loss", "val open %", "train s",
              title="one-token runs from each base (seed 0, one thread, constant rate)")
    for r in crows:
        t.add_row(r["base"], r["method"], str(r["steps"]), f"{r['best_val_loss']:.4f}", f"{r['val_open']:.1f}",
                  f"{r['train_seconds']:.0f}")
    console.print(t)
    (out / "compress.json").write_text(json.dumps(crows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
