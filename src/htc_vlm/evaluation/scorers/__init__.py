"""Benchmark scorers, one file each, and their registry. Adding a benchmark = one scorer file plus
an entry here (its question format is the LLaVA-style JSONL the runner reads).

Each scorer is ``score(questions, predictions) -> dict`` where ``questions`` are the question-file
rows and ``predictions`` maps question_id to the model's raw text. Every metric is in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...errors import HTCError
from . import gqa, mcq, mme, pope, vqa


@dataclass(frozen=True)
class Benchmark:
    name: str
    score: Callable[[list[dict], dict[str, str]], dict]
    headline: str  # the metric of the paper's tables
    prompt_suffix: str = ""  # appended to each question, as LLaVA's evaluation scripts do
    multiple_choice: bool = False
    source: str = ""


SHORT = "Answer the question using a single word or phrase."
BENCHMARKS = {b.name: b for b in (
    Benchmark("vqav2", vqa.scorer("vqaeval"), "accuracy", SHORT,
              source="VQAv2 official vqaEval.py: answers normalised only where the humans disagree"),
    Benchmark("vqav2_normalized", vqa.scorer("normalized"), "accuracy", SHORT,
              source="VQA accuracy with every answer normalised (EvalAI's processor, as lmms-eval)"),
    Benchmark("textvqa", vqa.scorer("textvqa"), "accuracy", SHORT,
              source="TextVQA m4c_evaluator (EvalAI's answer processor on both sides)"),
    Benchmark("gqa", gqa.score, "accuracy", SHORT, source="GQA exact match after LLaVA-1.5's convert_gqa_for_eval (rstrip '.', lower)"),
    Benchmark("pope", pope.score, "f1", SHORT, source="POPE (LLaVA eval_pope parsing)"),
    Benchmark("mme", mme.score, "perception", source="MME official calculation.py"),
    Benchmark("mmbench", mcq.score_circular, "circular_accuracy", multiple_choice=True,
              source="MMBench circular evaluation, letters read by VLMEvalKit's can_infer (c6bdffd3, no judge)"),
    Benchmark("seed", mcq.scorer(mcq.read_seed), "accuracy", multiple_choice=True,
              source="SEED-Bench, LLaVA-1.5 convert_seed_for_submission: the answer equals the letter"),
    Benchmark("scienceqa_img", mcq.scorer(mcq.read_scienceqa), "accuracy", multiple_choice=True,
              source="ScienceQA-IMG, LLaVA-1.5 eval_science_qa: 'X', 'X. ...' or 'The answer is X'"),
    # The generated scene benchmark's open family is scored like VQAv2 with its single answer.
    Benchmark("scenes_open", vqa.scorer("normalized"), "accuracy",
              source="VQA accuracy, every answer normalised, one reference answer"),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise HTCError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
