"""When do compression runs converge by issue 14's rule? Every prefix of each validation curve, judged.

Issue 14 asks every compression run to train until its validation loss is flat: the best loss of its last
20% of steps improves on the best before them by less than 1% (``training/plateau.py``, ``is_flat``). A
run that trains longer at a constant learning rate (the tiny preset's schedule after its warm-up) passes
through every shorter run, so one long run's curve answers for every step count at once: this script
judges each prefix of each curve (every evaluation from ``--from`` on) and prints, per run,

- ``first flat``: the first step count at which the prefix is flat (where an early stop would fire);
- ``flat from``: the step count from which every longer prefix is flat too (none when the whole curve is
  not flat): the steps a run needs before the rule holds for good;
- the trend at the end (``trend_gain``, the report's second opinion) and whether it resolves a fall;
- at each of ``--at`` step counts, how far the best loss so far is above the whole curve's best (%).

    python benchmarks/convergence.py RUN/steps-10000/htc-b1/model RUN/steps-10000/voco-b1/model [--at 3000 6000]
        [--from 1000] [--out convergence.json] [--plot convergence.png]

Each argument is a model folder (or its ``val_curve.json``) that ``htc-vlm train`` wrote with
``optim.eval_steps`` set. Reads files only; trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from htc_vlm.training.plateau import FLAT_TOLERANCE, is_falling, is_flat, trend_gain


def read_curve(path: Path) -> tuple[list[tuple[int, float]], float]:
    """(step, validation loss) pairs and the window share of a val_curve.json (or the model folder holding one)."""
    f = path / "val_curve.json" if path.is_dir() else path
    if not f.exists():
        raise SystemExit(f"{path}: no val_curve.json (a model folder of htc-vlm train with optim.eval_steps set)")
    try:
        c = json.loads(f.read_text())
        return list(zip(c["steps"], c["val_loss"])), float(c.get("window", 0.2))
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{f}: not a validation curve ({e})") from None


def judge(curve: list[tuple[int, float]], window: float, at: list[int], start: int,
          tolerance: float = FLAT_TOLERANCE) -> dict:
    """Issue 14's rule on every prefix of ``curve`` ending at or after step ``start``."""
    flat = [(s, is_flat(curve[: i + 1], tolerance, window)) for i, (s, _) in enumerate(curve) if s >= start]
    first = next((s for s, f in flat if f), None)
    flat_from = None
    for s, f in reversed(flat):
        if not f:
            break
        flat_from = s
    best = min(v for _, v in curve)
    trend = trend_gain(curve, window)
    return {"final_step": curve[-1][0], "best_loss": round(best, 4), "flat_at_end": bool(flat and flat[-1][1]),
            "first_flat": first, "flat_from": flat_from, "prefixes_flat": sum(f for _, f in flat),
            "prefixes": len(flat), "trend_gain": None if trend is None else [round(x, 4) for x in trend],
            "falling_at_end": is_falling(trend, tolerance),
            "above_best_pct": {s: round(100 * (min(v for t, v in curve if t <= s) / best - 1), 2)
                               for s in at if s <= curve[-1][0]}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("curves", type=Path, nargs="+", help="model folders (or val_curve.json files)")
    ap.add_argument("--at", type=int, nargs="+", default=[3000, 6000, 10000, 15000],
                    help="step counts at which to give the best loss so far against the whole curve's best")
    ap.add_argument("--from", dest="start", type=int, default=1000, help="judge prefixes ending at this step or later")
    ap.add_argument("--out", type=Path, default=None, help="write the judgements as JSON")
    ap.add_argument("--plot", type=Path, default=None, help="plot the curves and where each became flat for good")
    a = ap.parse_args(argv)
    names = [str(p.parent if p.name == "val_curve.json" else p) for p in a.curves]
    short = {n: "/".join(Path(n).parts[-2:]) for n in names}  # RUN/.../htc-b1/model -> htc-b1/model
    read = [read_curve(p) for p in a.curves]
    results = {n: judge(c, w, a.at, a.start) for n, (c, w) in zip(names, read)}
    console = Console(width=None if sys.stdout.isatty() else 160)
    t = Table("run", "steps", "best loss", "flat at end", "first flat", "flat from", "trend gain +- se",
              *(f"best by {s} (% above)" for s in a.at),
              title=f"issue 14's rule (best loss of the last 20% of steps improves < {FLAT_TOLERANCE:.0%}) on every prefix")
    for n, r in results.items():
        tg = r["trend_gain"]
        t.add_row(short[n], str(r["final_step"]), f"{r['best_loss']:.4f}", "yes" if r["flat_at_end"] else "no",
                  str(r["first_flat"] or "-"), str(r["flat_from"] or "-"),
                  "-" if tg is None else f"{100 * tg[0]:+.1f}% +- {100 * tg[1]:.1f}" + (" falling" if r["falling_at_end"] else ""),
                  *(f"{r['above_best_pct'][s]:.1f}" if s in r["above_best_pct"] else "-" for s in a.at))
    console.print(t)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    if a.plot:
        try:
            import matplotlib
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install -e '.[plot]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for n, (c, _) in zip(names, read):
            line, = ax.plot([s for s, _ in c], [v for _, v in c], lw=1, label=short[n])
            if (s := results[n]["flat_from"]) is not None:
                ax.axvline(s, color=line.get_color(), ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title("validation curves; dotted: flat by issue 14's rule from here on")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        console.print(f"plot: {a.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
