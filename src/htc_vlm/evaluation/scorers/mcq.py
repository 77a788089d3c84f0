"""Multiple choice by letter: SEED-Bench and ScienceQA-IMG accuracy, MMBench circular evaluation.

Options are read from free text as MMBench's evaluator does before asking a judge model: a
leading letter ("B", "(B)", "B." ...), else exactly one option letter standing alone among the
words, else exactly one option's text inside the answer; otherwise no option (wrong).

Circular evaluation (MMBench): a question with N options is asked N times with the options
rotated; it counts as right only if every rotation is answered right. The runner writes the
rotations as ``{id}@r{k}``; rows carry ``options`` and the letter ``answer``.
"""

from __future__ import annotations

import re
from collections import defaultdict

LETTERS = "ABCDEFGH"


def extract(text: str, options: list[str]) -> str | None:
    letters = LETTERS[: len(options)]
    t = text.strip()
    m = re.match(rf"^\(?([{letters}])(?:[\.\):]|\s|$)", t)
    if m:
        return m.group(1)
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", t).split()
    found = {w for w in words if w in letters}
    if len(found) == 1:
        return found.pop()
    low = t.lower()
    hits = [letters[i] for i, opt in enumerate(options) if opt and opt.lower() in low]
    return hits[0] if len(hits) == 1 else None


def _right(q: dict, prediction: str) -> bool:
    return extract(prediction, q.get("options") or list("ABCD")) == q["answer"].strip()


def score(questions: list[dict], predictions: dict[str, str]) -> dict:
    hits = [_right(q, predictions[q["question_id"]]) for q in questions]
    return {"accuracy": 100 * sum(hits) / len(hits), "n": len(hits)}


def rotations(q: dict) -> list[dict]:
    """The N rotated copies of a question row (the prompt rebuilt by the caller's ``prompt``)."""
    opts, n = q["options"], len(q["options"])
    k0 = LETTERS.index(q["answer"])
    out = []
    for k in range(n):
        rot = opts[k:] + opts[:k]
        out.append(q | {"question_id": f"{q['question_id']}@r{k}", "options": rot,
                        "answer": LETTERS[(k0 - k) % n], "circular_of": q["question_id"]})
    return out


def score_circular(questions: list[dict], predictions: dict[str, str]) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        groups[q.get("circular_of", q["question_id"])].append(_right(q, predictions[q["question_id"]]))
    single = [q for q in questions if q["question_id"].endswith("@r0") or "circular_of" not in q]
    return {"circular_accuracy": 100 * sum(all(v) for v in groups.values()) / len(groups),
            "accuracy": 100 * sum(_right(q, predictions[q["question_id"]]) for q in single) / len(single),
            "n": len(groups)}
