"""Retention, the paper's Table 1 measure: ``(R - Lower) / (Upper - Lower)`` per benchmark, and
its average over benchmarks, with and without ScienceQA-IMG (whose retention can exceed 100%).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HTCError

SQA = "scienceqa_img"


def retention(result: float, lower: float, upper: float) -> float:
    if upper == lower:
        raise HTCError(f"upper and lower bound are equal ({upper}): retention is undefined")
    return 100 * (result - lower) / (upper - lower)


def table(upper: dict[str, float], lower: dict[str, float], runs: dict[str, dict[str, float]]) -> dict:
    """``{method: {benchmark: {"score", "retention"}, "avg", "avg_without_sqa"}}`` over the
    benchmarks every run shares with both bounds."""
    benches = [b for b in upper if b in lower and all(b in r for r in runs.values())]
    if not benches:
        raise HTCError("the runs and the bounds share no benchmark")
    out = {}
    for name, scores in {"upper": upper, **runs, "lower": lower}.items():
        row = {b: {"score": scores[b], "retention": retention(scores[b], lower[b], upper[b])} for b in benches}
        rets = [row[b]["retention"] for b in benches]
        no_sqa = [row[b]["retention"] for b in benches if b != SQA]
        row["avg"] = sum(rets) / len(rets)
        row["avg_without_sqa"] = sum(no_sqa) / len(no_sqa) if no_sqa else None
        out[name] = row
    return {"benchmarks": benches, "rows": out}


def markdown(t: dict) -> str:
    benches = t["benchmarks"]
    lines = ["| method | " + " | ".join(benches) + " | avg (%) | avg w/o SQA-I (%) |",
             "|---|" + "---|" * (len(benches) + 2)]
    for name, row in t["rows"].items():
        cells = [f"{row[b]['score']:.1f} ({row[b]['retention']:.1f}%)" for b in benches]
        wo = "" if row["avg_without_sqa"] is None else f"{row['avg_without_sqa']:.1f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['avg']:.1f} | {wo} |")
    return "\n".join(lines)


def load_scores(path: str | Path) -> tuple[str, dict[str, float]]:
    """A metrics JSON of ``htc-vlm eval`` (or a merged ``{"method", "scores": {bench: value}}``)."""
    data = json.loads(Path(path).read_text())
    if "scores" not in data:
        raise HTCError(f"{path} is not a metrics file of htc-vlm eval (no 'scores')")
    return data.get("method", Path(path).stem), {k: float(v) for k, v in data["scores"].items()}
