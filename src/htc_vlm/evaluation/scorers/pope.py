"""POPE (Li et al. 2023): accuracy, precision, recall, F1 and yes-ratio, "yes" being positive.

Free text is parsed as LLaVA's ``eval_pope`` does: keep the first sentence, drop commas, and read
"no" if the words contain ``No``, ``no`` or ``not``, else "yes". Split by ``category`` (random,
popular, adversarial) when the rows carry one.
"""

from __future__ import annotations

from collections import defaultdict


def parse(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _metrics(pairs: list[tuple[str, str]]) -> dict:
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * (tp + tn) / len(pairs), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * (tp + fp) / len(pairs), "n": len(pairs)}


def score(questions: list[dict], predictions: dict[str, str]) -> dict:
    pairs = [(parse(predictions[q["question_id"]]), q["answer"].strip().lower()) for q in questions]
    out = _metrics(pairs)
    by_cat = defaultdict(list)
    for q, pair in zip(questions, pairs):
        if "category" in q:
            by_cat[q["category"]].append(pair)
    if len(by_cat) > 1:
        out["per_category"] = {c: _metrics(p) for c, p in sorted(by_cat.items())}
        out["f1"] = sum(m["f1"] for m in out["per_category"].values()) / len(by_cat)  # the paper's average
        out["accuracy"] = sum(m["accuracy"] for m in out["per_category"].values()) / len(by_cat)
    return out
