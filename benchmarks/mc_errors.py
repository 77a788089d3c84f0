"""Why a content-letter model misses multiple choice: the answer's text, or the letter of that text?

With ``--mc-form content-letter`` a model answers an MC question with the option's text and then its
letter ("yellow D"); only the letter is scored (VLMEvalKit's matcher, circular over rotations). This
splits each rotated answer of an evaluation into: the text is the right option's; the letter names the
option the model's own text is (the lookup among the options); the letter is right. A model that knows
the answer but fails the lookup scores high on the first and low on the second. The same split follows
for each kind of question (colour, shape at a place, count, place of a shape).

    python benchmarks/mc_errors.py EVAL/mc/predictions.jsonl RUN/scenes/val/mc.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from htc_vlm.data.scenes import read_jsonl
from htc_vlm.evaluation.scorers.mcq import LETTERS, extract, rotations


def split_errors(questions: list[dict], predictions: dict[str, str]) -> dict:
    """Per rotated question: % whose text is the right option's, % whose letter is the option of the
    model's own text, % whose letter is right (the scorer's reading); and the count."""
    text_ok = lookup_ok = letter_ok = n = 0
    for q in questions:
        for r in rotations(q):
            answer = predictions[r["question_id"]].strip()
            text, _, letter = answer.rpartition(" ")
            right = r["options"][LETTERS.index(r["answer"])]
            text_ok += text == right
            lookup_ok += text in r["options"] and letter == LETTERS[r["options"].index(text)]
            letter_ok += extract(answer, r["options"]) == r["answer"]
            n += 1
    return {"text_right": 100 * text_ok / n, "letter_of_own_text": 100 * lookup_ok / n,
            "letter_right": 100 * letter_ok / n, "n": n}


def by_kind(questions: list[dict], predictions: dict[str, str]) -> dict[str, dict]:
    """:func:`split_errors` for each kind of question (its ``template``: mc/color, mc/count, ...)."""
    kinds = sorted({q.get("template", "?") for q in questions})
    return {k: split_errors([q for q in questions if q.get("template", "?") == k], predictions) for k in kinds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", type=Path, help="an evaluation's mc/predictions.jsonl")
    ap.add_argument("questions", type=Path, help="the questions it answered (scenes/SPLIT/mc.jsonl)")
    a = ap.parse_args(argv)
    preds = {p["question_id"]: p["prediction"] for p in read_jsonl(a.predictions)}
    questions = read_jsonl(a.questions)
    for name, r in [("", split_errors(questions, preds))] + [(f"  {k}: ", r) for k, r in by_kind(questions, preds).items()]:
        print(f"{name}{r['n']} rotated answers: text right {r['text_right']:.1f}%, letter of its own text "
              f"{r['letter_of_own_text']:.1f}%, letter right {r['letter_right']:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
