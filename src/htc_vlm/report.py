"""``report.md``, ``results.json`` and the figures of a ``htc-vlm reproduce`` run, from its
``run.json`` alone: every number links to the stage (checkpoint and command) that produced it.

Retention is the paper's ``(R - Lower) / (Upper - Lower)`` per question family; a family where
the upper bound does not beat the lower bound has no retention and is left out of the averages
(the report says so).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from .evaluation.retention import retention
from .training.plateau import is_falling, trend_gain



def table1_rows() -> list[tuple[str, str]]:
    """(evaluation key, label) of Table 1's rows: the bounds, then each one-token method at seed 0,
    from the method registry (its order is the tables' order)."""
    from .methods.registry import METHODS, in_table

    bounds = [(m, METHODS[m].label or m) for m in in_table("1", "bound")]
    return bounds + [(f"{m}-b1", METHODS[m].label or m) for m in in_table("1", "trained")]


def table2_methods() -> list[str]:
    """Table 2's methods: the training-free ones, then the trained ones it lists."""
    from .methods.registry import in_table

    return [*in_table("2", "training-free"), *in_table("2", "trained")]


def _done(record: dict, name: str) -> dict | None:
    s = record["stages"].get(name)
    return s if s and s.get("status") == "done" else None


def _retentions(scores: dict, upper: dict, lower: dict) -> dict:
    out = {}
    for fam, v in scores.items():
        if fam in upper and fam in lower and upper[fam] > lower[fam]:
            out[fam] = round(retention(v, lower[fam], upper[fam]), 1)
    return out


def _avg(d: dict, fams) -> float | None:
    vals = [d[f] for f in fams if f in d]
    return round(sum(vals) / len(vals), 1) if vals else None


def _cell(score, ret) -> str:
    return "" if score is None else (f"{score:.1f}" + (f" ({ret:.0f}%)" if ret is not None else ""))


def _num_patches(out: Path) -> int | None:
    """Patch tokens per image of the run's upper bound (read from its saved config)."""
    path = out / "instruct" / "model" / "config.json"
    if not path.exists():
        return None
    v = json.loads(path.read_text())["vision_config"]
    return (v["image_size"] // v["patch_size"]) ** 2


def _ci(c: dict | None) -> str:
    return "" if not c else f"{c['mean']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}]"


def _steps_note(record: dict, seeds: list[int]) -> list[str]:
    """How many steps HTC's and VoCo's Table 1 runs trained: the early stop may give them unequal training,
    and then their difference may be where the stop fired (docs/results.md, session 32)."""
    from .reproduce import recorded_preset, seed_key

    p = recorded_preset(record["preset"])
    steps = {m: [c["final_step"] for s in seeds
                 if isinstance(c := record["stages"].get(f"train/{seed_key(m, s, p)}", {}).get("val_curve"), dict)]
             for m in ("htc", "voco")}
    if not (steps["htc"] and steps["voco"]):
        return []
    said = f"HTC's runs trained {' / '.join(map(str, steps['htc']))} steps and VoCo's {' / '.join(map(str, steps['voco']))}"
    if len(set(steps["htc"] + steps["voco"])) == 1:
        return ["", f"{said}: equal training."]
    return ["", f"{said}. Their difference may be where the early stop fired rather than the methods: "
                "`python benchmarks/equal_steps.py RUN --jobs 2` trains both to the same step count and "
                "compares them (docs/results.md)."]


def _intervals_section(iv: dict, fams: list[str], record: dict) -> list[str]:
    labels = {"upper": "upper bound", "lower": "lower bound"} | {k.split("-")[0]: v for k, v in table1_rows()[2:]}
    bases = ("each seed with its own base model: the bounds are one model per seed, and every one-token run "
             "compressed its seed's base" if iv.get("base_per_seed") else
             "one base model: the bounds are one model each, and every one-token run compressed it")
    lines = ["### Table 1 with 95% intervals", "",
             f"Mean over training seeds {', '.join(map(str, iv['seeds']))} ({bases}), 95% "
             f"percentile interval of a bootstrap over test images and seeds ({iv['replicates']} replicates; "
             "`intervals.json`).", "",
             "| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for m, cells in iv["cells"].items():
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(_ci(cells.get(f)) for f in fams) + " |")
    d = iv["htc_minus_voco"]
    lines += ["", "**HTC - VoCo** on the same test questions (points; 95% interval; two-sided bootstrap p; on "
              "`open` also a sign-flip permutation test over questions):", "",
              "| family | HTC - VoCo | 95% interval | p (bootstrap) | p (sign flip) |", "|---|---|---|---|---|"]
    for f in fams:
        if f in d:
            x = d[f]
            lines.append(f"| {f} | {x['difference']:+.2f} | [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}] | "
                         f"{x['p_bootstrap']:.3f} | {x.get('p_sign_flip', '')} |")
    return lines + _steps_note(record, iv["seeds"]) + [""]


def _convergence_section(out: Path, record: dict, rows: "_Rows | None" = None) -> tuple[list[str], dict]:
    runs = {k[len("train/"):]: v["val_curve"] for k, v in record["stages"].items()
            if k.startswith("train/") and v.get("status") == "done" and v.get("val_curve")}
    if not runs:
        return [], {}
    _plot_val_curves(out, runs)
    capped = [k for k, c in runs.items() if not c["flat"]]
    rule = next(iter(runs.values()))  # window and tolerance: the same for every run of a preset
    flat = (f"the best loss of the last {100 * rule['window']:.0f}% of its steps improved by less than "
            f"{100 * rule['tolerance']:.0f}% (relative)")
    from .reproduce import recorded_preset

    p = recorded_preset(record["preset"])  # a record older than compress_early_stop takes its default: it stopped early
    early = p.compress_early_stop
    how = (f"Each run evaluates its loss on the validation conversations and stops once {flat}." if early else
           f"Each run trains {p.compress_max_steps} steps, evaluating its loss on the validation "
           f"conversations; it is flat when {flat}. No run stops early: the test reads noise, and stopping on it "
           "gave the methods unequal training (docs/LOG.md, session 32).")
    if p.compress_keep_best:
        how += (" Each run's model is the checkpoint of its lowest validation loss (the table's 'kept' step), "
                "not its last step's.")
    lines = ["## Convergence of the compression runs", "", how, "",
             "![validation curves](val_curves.png)", "",
             "The best-loss test reads noise (one evaluation moves 1-4% from the next), so the table also gives "
             "the gain a least-squares line through the evaluations of the last "
             f"{200 * rule['window']:.0f}% of the steps predicts over the same window, with its "
             "standard error (training/plateau.py, `trend_gain`).", "",
             "| run | steps | kept | best val loss | gain over the last window | flat | trend over the last window |",
             "|---|---|---|---|---|---|---|"]
    falling = []
    for k, c in runs.items():
        gain = c["relative_gain_last_window"]
        trend = trend_gain(list(zip(c["steps"], c["val_loss"])), c["window"])
        if is_falling(trend, c["tolerance"]):
            falling.append(k)
        lines.append(f"| {k} | {c['final_step']} | {c.get('kept_step', c['final_step'])} | {min(c['val_loss']):.4f} | "
                     f"{'' if gain is None else f'{100 * gain:.2f}%'} | {'yes' if c['flat'] else '**no**'} | "
                     f"{'' if trend is None else f'{100 * trend[0]:+.1f}% ± {100 * trend[1]:.1f}'} |")
    if capped:
        lines += ["", f"**Not flat{' (stopped by the step cap)' if early else ''}: {', '.join(capped)}.**"]
    if falling:
        lines += ["", f"**Still falling by the trend (more than {100 * rule['tolerance']:.0f}% "
                      f"by two standard errors): {', '.join(falling)}.**"]
    return lines + [""], {}


class _Rows:
    """A run's evaluated rows: scores, open accuracy by tag and retention against the run's bounds."""

    def __init__(self, record: dict):
        self.record = record
        up, lo = _done(record, "eval/upper"), _done(record, "eval/lower")
        self.bounds = (up["scores"], lo["scores"]) if up and lo else None

    def __call__(self, key: str) -> dict | None:
        s = _done(self.record, f"eval/{key}")
        if not s:
            return None
        rets = _retentions(s["scores"], *self.bounds) if self.bounds else {}
        return {"scores": s["scores"], "open_by_tag": s.get("open_by_tag", {}), "retention": rets,
                "avg_retention": _avg(rets, rets), "stage": f"eval/{key}"}


def render(out: Path, record: dict) -> tuple[str, dict]:
    """(``report.md``'s text, ``results.json``'s content): one section per table, each from its stages."""
    lines = [f"# htc-vlm reproduce: preset {record['preset']['name']}", ""]
    val = _done(record, "val/upper")
    if val:
        lines += [f"Upper bound on the validation split (recipe check): open {val['scores']['open']:.1f}%.", ""]
    results: dict = {"preset": record["preset"], "stages": record["stages"]}
    for k, v in record["stages"].items():
        if v.get("status") == "failed":
            lines += [f"**Stage `{k}` failed: {v['error']}.** Run the same command again to resume there.", ""]
    rows = _Rows(record)
    for section in (_table1_section, _template_section, _seeds_section, _table2_section, _table4_section,
                    _convergence_section, _probing_section, _attention_section, _provenance_section):
        text, part = section(out, record, rows)
        lines += text
        results |= part
    return "\n".join(lines) + "\n", results


def _table1_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    up = _done(record, "eval/upper")
    if not up:
        return [], {}
    fams = list(up["scores"])
    lines = ["## Table 1 analog: everything to one visual token", "",
             "Scores per question family (open: VQA accuracy; pope: F1; mme: total score; mc: circular "
             "accuracy), retention in brackets; `avg ret.` averages the families with a defined retention.", "",
             "| method | " + " | ".join(fams) + " | open semantic | open detail | avg ret. (%) |",
             "|---|" + "---|" * (len(fams) + 3)]
    t1 = {}
    for key, label in table1_rows():
        d = rows(key)
        if d is None:
            continue
        t1[key] = d
        cells = [_cell(d["scores"].get(f), d["retention"].get(f)) for f in fams]
        tags = [_cell(d["open_by_tag"].get(t), None) for t in ("semantic", "detail")]
        lines.append(f"| {label} | " + " | ".join(cells + tags) + f" | {d['avg_retention'] or ''} |")
    if rows.bounds:
        upper, lower = rows.bounds
        gaps = ", ".join(f"{f} {upper[f]:.1f} vs {lower[f]:.1f}" for f in fams if f in lower)
        lines += ["", f"Bounds (upper vs lower): {gaps}. Where they are close, retention is noise: read "
                      f"the scores, and the open column first."]
        undefined = [f for f in fams if f in lower and upper[f] <= lower[f]]
        if undefined:
            lines += ["", f"No retention for {', '.join(undefined)}: the upper bound does not beat the lower "
                          f"bound there."]
    results = {"table1": t1}
    _plot_retention(out, t1)
    if (out / "retention.png").exists():
        lines += ["", "![retention per method](retention.png)"]
    lines.append("")
    iv = _done(record, "table1/intervals")
    if iv:
        lines += _intervals_section(iv, fams, record)
        results["table1_intervals"] = {"cells": iv["cells"], "htc_minus_voco": iv["htc_minus_voco"]}
    return lines, results


def _template_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    per_t = {label: _by_template(out, key) for key, label in table1_rows() if _done(record, f"eval/{key}")}
    if _done(record, "eval/upper"):
        per_t["upper bound, one-object scenes only"] = _by_template(out, "upper", one_object=True)
    per_t = {k: v for k, v in per_t.items() if v}
    if not per_t:
        return [], {}
    temps = sorted({t for v in per_t.values() for t in v})
    lines = ["### Open questions per template (accuracy %)", "",
             "| method | " + " | ".join(temps) + " |", "|---|" + "---|" * len(temps)]
    for label, v in per_t.items():
        lines.append(f"| {label} | " + " | ".join(f"{v[t]:.1f}" if t in v else "" for t in temps) + " |")
    return lines + [""], {"open_by_template": per_t}


def _seeds_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    seeds = _seed_rows(record, rows)
    if not seeds:
        return [], {}
    lines = ["## One-token methods over training seeds", "",
             "| method | seeds | open accuracy, mean (min-max) | avg retention %, mean (min-max) |", "|---|---|---|---|"]
    for m, runs in seeds.items():
        acc = [r["scores"]["open"] for r in runs]
        ret = [r["avg_retention"] for r in runs if r["avg_retention"] is not None]
        fmt = lambda v: f"{statistics.mean(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else ""  # noqa: E731
        lines.append(f"| {m} | {len(runs)} | {fmt(acc)} | {fmt(ret)} |")
    return lines + [""], {"seeds": seeds}


def _table2_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    budgets = record["preset"]["budgets"]
    t2 = {m: {b: rows(f"{m}-b{b}") for b in budgets} for m in table2_methods()}
    if not any(d for per in t2.values() for d in per.values()):
        return [], {}
    fams2 = record["preset"]["table2_families"]
    lines = ["## Table 2 analog: fixed token budgets", "",
             f"Budgets {', '.join(map(str, budgets))} of {_num_patches(out)} patch tokens (the paper's 192 / 128 / 64 "
             f"of 576). Cells: open accuracy (its retention); `results.json` also has "
             f"{', '.join(fams2[1:]) or 'no other family'}.", "",
             "| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m, per in t2.items():
        cells = ["" if per[b] is None else _cell(per[b]["scores"].get("open"), per[b]["retention"].get("open"))
                 for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    _plot_budgets(out, t2, budgets)
    if (out / "budgets.png").exists():
        lines += ["", "![retention per budget](budgets.png)"]
    return lines + [""], {"table2": {m: {str(b): d for b, d in per.items()} for m, per in t2.items()}}


def _table4_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    abl = _ablation_rows(record, rows)
    if not abl:
        return [], {}
    fams2 = record["preset"]["table2_families"]
    lines = ["## Table 4 analog: ablations (budget 1)", "",
             "| ablation | setting | " + " | ".join(fams2) + " | avg ret. (%) |", "|---|---|" + "---|" * (len(fams2) + 1)]
    for (group, setting), d in abl.items():
        cells = [_cell(d["scores"].get(f), d["retention"].get(f)) for f in fams2]
        lines.append(f"| {group} | {setting} | " + " | ".join(cells) + f" | {_avg(d['retention'], fams2) or ''} |")
    return lines + [""], {"table4": {f"{g}: {s}": d for (g, s), d in abl.items()}}


def _probing_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    pr = _done(record, "probing")
    if not pr:
        return [], {}
    lines = ["## Table 3 analog: linear probes (top-1 %, test split)", "",
             "Semantic: object count, shape of the first object (raster order); detail: its colour and texture.", "",
             "| model | representation | count | shape | colour | texture | semantic | detail |", "|---|---|---|---|---|---|---|---|"]
    for model, reps in pr["probes"].items():
        for rep, r in reps.items():
            lines.append(f"| {model} | {rep} | " + " | ".join(f"{r[k]:.1f}" for k in
                         ("count", "shape", "colour", "texture", "semantic", "detail")) + " |")
    return lines + [""], {}


def _attention_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    at = _done(record, "attention")
    if not at:
        return [], {}
    return ["## Figure 3 analog: voco attention", "", "![voco attention](attention.png)", "",
            f"{at['caption']}. HTC's voco token gives {100 * at['anchor_share']:.1f}% of its image-block "
            f"attention to the anchors.", ""], {}


def _provenance_section(out: Path, record: dict, rows: _Rows) -> tuple[list[str], dict]:
    lines = ["## Provenance", "", "Every table cell above comes from the `eval/<key>` stage of its row; the model "
             "it evaluated and the command that reproduces it are listed here.", "",
             "| stage | status | seconds | threads | outputs | command |", "|---|---|---|---|---|---|"]
    for k, s in record["stages"].items():
        if s["status"] == "done":
            lines.append(f"| {k} | done | {s.get('seconds', '')} | {s.get('threads', '')} | {s.get('outputs', '')} "
                         f"| `{s.get('command', '')}` |")
        else:
            lines.append(f"| {k} | {s['status']}: {s.get('error', '')} | | | | |")
    tok = _done(record, "tokenizer")
    if tok:
        lines += ["", f"Tokenizer: held-out PSNR {tok['psnr_db']} dB, min codebook usage {tok['min_codebook_usage']}."]
    total = sum(s.get("seconds", 0) for s in record["stages"].values())
    calls = record.get("calls", [])
    wall = (f"; wall time {sum(c['wall_s'] for c in calls) / 60:.1f} min over {len(calls)} call(s) of "
            f"`htc-vlm reproduce` (--jobs {', '.join(sorted({str(c['jobs']) for c in calls}))})") if calls else ""
    return lines + ["", f"Total stage time: {total / 60:.1f} min{wall}.", *_machines(calls)], {}


def _machines(calls: list[dict]) -> list[str]:
    """Where the run's calls computed: one line, or each call's and a warning when they differ in what
    decides the numbers (CPU, kernels, GPU, versions; htc_vlm/machine.py)."""
    from .machine import arithmetic, summary

    seen = [c["machine"] for c in calls if "machine" in c]
    if not seen:
        return []
    if all(arithmetic(m) == arithmetic(seen[0]) for m in seen):
        return ["", f"Machine: {summary(seen[-1])}."]
    return ["", "**Machines differ between the calls of this run**: stages of different calls were computed with "
            "other kernels or versions, so they round differently and a rerun elsewhere may not repeat them.", "",
            *(f"- call {i}: {summary(c['machine'])}" for i, c in enumerate(calls, 1) if "machine" in c)]


def _by_template(out: Path, key: str, one_object: bool = False) -> dict:
    """Open-question accuracy per question template, from the stage's predictions file (optionally on
    the test scenes holding a single object only)."""
    from .data.scenes import read_jsonl
    from .evaluation.runner import accuracy_by

    preds_path = out / "eval" / key / "open" / "predictions.jsonl"
    qfile, sfile = out / "scenes" / "test" / "open.jsonl", out / "scenes" / "test" / "scenes.jsonl"
    if not preds_path.exists() or not qfile.exists() or not sfile.exists():
        return {}
    n_obj = {s["image"]: len(s["objects"]) for s in read_jsonl(sfile)}
    acc = accuracy_by(preds_path, read_jsonl(qfile), lambda q: q["template"].split("/")[1]
                      if not one_object or n_obj.get(q["image"]) == 1 else None)
    return {t: round(v, 1) for t, v in acc.items()}


def _seed_rows(record, row_data) -> dict:
    out = {}
    for m in (k.split("-")[0] for k, _ in table1_rows()[2:]):
        keys = [k[len("eval/"):] for k in record["stages"] if k.startswith(f"eval/{m}-b1") and
                (k == f"eval/{m}-b1" or k.startswith(f"eval/{m}-b1-s"))]
        rows = [row_data(k) for k in keys]
        rows = [r for r in rows if r]
        if len(rows) >= 2:
            out[m] = rows
    return out


def _ablation_rows(record, row_data) -> dict:
    """Table 4's rows: the channels, then each ablated HTC option over the values the run's preset lists."""
    from .reproduce import RunPreset, ablation_key

    rows, preset = {}, asdict(RunPreset(record["preset"].get("name", ""))) | record["preset"]  # defaults fill gaps
    spec = [("channels", "hybrid (HTC)", "htc-b1"), ("channels", "continuous only (VoCo)", "voco-b1"),
            ("channels", "discrete only", "discrete-b1")]
    for group, option, values in (("N_d", "num_anchors", preset["anchors"]), ("fusion", "fusion", preset["fusions"]),
                                  ("vision attention", "vision_attention", preset["attentions"])):
        spec += [(group, str(v), ablation_key(option, v)) for v in values]
    for group, setting, key in spec:
        if f"train/{key}" in record["stages"] or key == "htc-b1":
            d = row_data(key)
            if d:
                rows[(group, setting)] = d
    return rows if len(rows) > 1 else {}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_retention(out: Path, t1: dict) -> None:
    rows = {k: d["avg_retention"] for k, d in t1.items() if d["avg_retention"] is not None}
    if len(rows) < 3:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(rows), list(rows.values()), color="tab:blue")
    ax.set_ylabel("avg retention (%)")
    ax.set_title("Table 1 analog: one visual token")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=120)
    plt.close(fig)


def _plot_val_curves(out: Path, runs: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, c in runs.items():
        line, = ax.plot(c["steps"], c["val_loss"], label=k, lw=1.2, ls="-" if c["flat"] else "--")
        kept = c.get("kept_step", c["final_step"])
        if kept != c["final_step"] and kept in c["steps"]:  # the model kept is not the last step's
            ax.plot(kept, c["val_loss"][c["steps"].index(kept)], "o", ms=4, color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss")
    ax.set_title("Compression runs: validation loss (dashed: not flat; dot: the model kept)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "val_curves.png", dpi=120)
    plt.close(fig)


def _plot_budgets(out: Path, t2: dict, budgets) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    drawn = False
    for m, per in t2.items():
        pts = [(b, per[b]["retention"]["open"]) for b in budgets if per[b] and "open" in per[b]["retention"]]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=m)
            drawn = True
    if not drawn:
        plt.close(fig)
        return
    ax.set_xlabel("visual tokens kept")
    ax.set_ylabel("open-question retention (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "budgets.png", dpi=120)
    plt.close(fig)
