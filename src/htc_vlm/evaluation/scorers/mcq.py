"""Multiple choice by letter, each benchmark read as the code behind the paper's numbers reads it.

``extract`` (MMBench, circular): VLMEvalKit's rule-based matcher (``vlmeval/utils/matching_util.py``
``can_infer`` as of commit c6bdffd3, 2024-03, the MMBench-era rule without its judge model). An
answer containing "Cannot determine the answer" (or VLMEvalKit's other refusals) is no option;
else ``.()[],:;!*#{}`` become spaces and, if exactly one option letter stands alone among the words,
that letter ("B and C" has two: none); else if exactly one option's text (lower-cased) occurs in the
lower-cased answer, that option; else none (wrong).

``read_seed`` (SEED-Bench): LLaVA-1.5's ``convert_seed_for_submission.py``: the answer, stripped,
must equal the letter exactly.

``read_scienceqa`` (ScienceQA-IMG): LLaVA-1.5's ``eval_science_qa.py``: the answer is a letter A-E,
or starts with "X. ", or contains exactly one "The answer is X"; a letter past the question's options
is wrong (LLaVA once drew a random option there; its current code counts it wrong, as we do).

Circular evaluation (MMBench): a question with N options is asked N times with the options
rotated; it counts as right only if every rotation is answered right. The runner writes the
rotations as ``{id}@r{k}``; rows carry ``options`` and the letter ``answer``.
"""

from __future__ import annotations

import re
from collections import defaultdict

LETTERS = "ABCDEFGH"
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


def extract(text: str, options: list[str] | None) -> str | None:
    """VLMEvalKit's ``can_infer``: an option letter, or None. Without ``options`` (a row that keeps
    them in its question text) only a lone letter A-D counts; no text is matched."""
    letters = LETTERS[: len(options)] if options else "ABCD"
    if any(r in text for r in REFUSALS):
        return None  # VLMEvalKit's "Z": no option
    words = [w.strip() for w in re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()]
    found = [c for c in letters if c in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return None
    low = text.lower()
    hits = [letters[i] for i, opt in enumerate(options or []) if str(opt).lower() in low]
    return hits[0] if len(hits) == 1 else None


def read_seed(text: str, options: list[str] | None = None) -> str | None:
    t = text.strip()
    return t if t in tuple(LETTERS[: len(options) if options else 4]) else None


SQA_LETTERS = ("A", "B", "C", "D", "E")  # LLaVA's --options list: membership, never substrings


def read_scienceqa(text: str, options: list[str] | None = None) -> str | None:
    if text in SQA_LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in SQA_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SQA_LETTERS[: len(options) if options else 5] else None


def _right(q: dict, prediction: str, read=extract) -> bool:
    letter = read(prediction, q.get("options"))
    return letter is not None and letter == q["answer"].strip()


def scorer(read):
    """``score(questions, predictions)``: letter accuracy with ``read`` turning an answer into a letter."""

    def score(questions: list[dict], predictions: dict[str, str]) -> dict:
        hits = [_right(q, predictions[q["question_id"]], read) for q in questions]
        return {"accuracy": 100 * sum(hits) / len(hits), "n": len(hits)}

    return score


score = scorer(extract)


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
