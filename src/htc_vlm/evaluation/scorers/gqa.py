"""GQA accuracy: exact match after normalisation (lower case, punctuation, articles, number words),
as LLaVA's ``eval_gqa`` and lmms-eval compare a short answer with GQA's single reference."""

from __future__ import annotations

from .vqa import normalize


def score(questions: list[dict], predictions: dict[str, str]) -> dict:
    hits = [normalize(predictions[q["question_id"]]) == normalize(q["answer"]) for q in questions]
    return {"accuracy": 100 * sum(hits) / len(hits), "n": len(hits)}
