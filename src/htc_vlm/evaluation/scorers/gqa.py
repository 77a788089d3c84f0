"""GQA accuracy as LLaVA-1.5's pipeline computes it: ``convert_gqa_for_eval.py`` turns each answer
into ``text.rstrip(".").lower()`` (the text already stripped of surrounding white space by the
answering script), and GQA's ``eval.py`` counts exact matches with the single reference. Nothing
else is normalised: "the left", "two" for "2" or "light blue" for "blue" are wrong."""

from __future__ import annotations


def normalize(text: str) -> str:
    return text.strip().rstrip(".").lower()


def score(questions: list[dict], predictions: dict[str, str]) -> dict:
    hits = [normalize(predictions[q["question_id"]]) == q["answer"] for q in questions]
    return {"accuracy": 100 * sum(hits) / len(hits), "n": len(hits)}
