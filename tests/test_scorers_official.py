"""Our scorers against the official code, item by item.

``fixtures/official_scores.json`` holds the per-item results of the official code run once outside
the project (``fixtures/make_official_scores.py`` says how): VQAv2's ``vqaEval.py``, TextVQA's
``m4c_evaluator`` (as LLaVA ships it) and LLaVA's ``eval_pope`` on adversarial predictions (case,
punctuation, articles, number words, contractions, "Yes, there is...", new lines, unicode, empty)
against reference sets where the humans agree and where they do not."""

import json
from pathlib import Path

import pytest

from htc_vlm.evaluation.scorers import get_benchmark, mcq, mme, pope, vqa

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_scores.json").read_text())


@pytest.mark.parametrize("rule, benchmark", [("vqaeval", "vqav2"), ("textvqa", "textvqa")])
def test_vqa_accuracy_equals_the_official_code_on_every_item(rule, benchmark):
    refs = FIXTURE["references"]
    items = FIXTURE["vqa"]
    assert len(items) >= 200
    ours = [round(100 * vqa.accuracy(it["prediction"], refs[it["references"]], rule), 2) for it in items]
    wrong = [(it["prediction"], it["references"], o, it[rule]) for it, o in zip(items, ours) if o != it[rule]]
    assert not wrong, wrong[:5]
    # and through the registered benchmark, as htc-vlm eval scores a file
    qs = [{"question_id": str(i), "answers": refs[it["references"]]} for i, it in enumerate(items)]
    m = get_benchmark(benchmark).score(qs, {str(i): it["prediction"] for i, it in enumerate(items)})
    assert m["accuracy"] == pytest.approx(sum(it[rule] for it in items) / len(items), abs=0.01)


def test_the_rules_differ_where_the_official_codes_do():
    """Unanimous humans: vqaEval.py compares the raw prediction; normalising rules do not."""
    assert vqa.accuracy("Yes.", ["yes"] * 10, "vqaeval") == 0.0
    assert vqa.accuracy("Yes.", ["yes"] * 10, "normalized") == 1.0
    assert vqa.accuracy("hello,world", ["hello, world"] * 7 + ["hello world"] * 3, "textvqa") == 0.0
    assert get_benchmark("vqav2_normalized").score([{"question_id": "1", "answers": ["2"] * 10}], {"1": "two"})[
        "accuracy"] == 100.0


def test_pope_reading_equals_llava_eval_pope_on_every_item():
    items = FIXTURE["pope"]
    wrong = [(it["prediction"], pope.parse(it["prediction"]), it["official"]) for it in items
             if pope.parse(it["prediction"]) != it["official"]]
    assert len(items) >= 80 and not wrong, wrong[:5]


MC = json.loads((Path(__file__).parent / "fixtures" / "official_mc.json").read_text())


def test_mmbench_letters_equal_vlmevalkit_can_infer_on_every_item():
    sets, items = MC["option_sets"], MC["mc"]
    wrong = [(it["prediction"], it["options"], mcq.extract(it["prediction"], sets[it["options"]]), it["vlmevalkit"])
             for it in items if mcq.extract(it["prediction"], sets[it["options"]]) != it["vlmevalkit"]]
    assert len(items) >= 300 and not wrong, wrong[:5]


# SEED-Bench and ScienceQA-IMG: LLaVA-1.5's scripts, derived by hand from their few lines
# (scripts/convert_seed_for_submission.py: text == answer; llava/eval/eval_science_qa.py: "X", "X. ...",
# or exactly one "The answer is X" (any character after X), a letter past the choices is wrong).
@pytest.mark.parametrize("text, letter", [
    ("B", "B"), (" B ", "B"), ("B.", None), ("(B)", None), ("b", None), ("B. cat", None), ("The answer is B.", None),
    ("cat", None), ("", None), ("E", None), ("BC", None), ("B\n", "B"),
])
def test_seed_reads_an_exact_letter_only(text, letter):
    assert mcq.read_seed(text, ["dog", "cat", "cow", "hen"]) == letter


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("E", "E"), ("B. cat", "B"), ("B.cat", None), ("B.", None), ("(B)", None), (" B", None),
    ("The answer is B.", "B"), ("The answer is B", None), ("The answer is Bx", "B"), ("the answer is B.", None),
    ("The answer is B. The answer is C.", None), ("I think The answer is C!", "C"), ("b", None), ("", None),
    ("BC", None), ("F", None), ("The answer is F.", None), ("A. ", "A"),
])
def test_scienceqa_reads_as_llava_eval_science_qa(text, letter):
    assert mcq.read_scienceqa(text, None) == letter  # a row without options: LLaVA's A-E


def test_scienceqa_letter_past_the_choices_is_wrong():
    assert mcq.read_scienceqa("D", ["a", "b", "c"]) is None and mcq.read_scienceqa("C", ["a", "b", "c"]) == "C"
    q = [{"question_id": "1", "answer": "C", "options": ["a", "b", "c"]}]
    assert get_benchmark("scienceqa_img").score(q, {"1": "C. c"})["accuracy"] == 100.0
    assert get_benchmark("seed").score(q, {"1": "C. c"})["accuracy"] == 0.0


CLOSED = json.loads((Path(__file__).parent / "fixtures" / "official_closed.json").read_text())
ANSWERS = CLOSED["predictions"]  # stripped, as the answering scripts write them


def _differences(ours, official):
    return [(a, o, r) for a, o, r in zip(ANSWERS, ours, official) if o != r]


def test_closed_fixture_is_adversarial_enough():
    assert len(ANSWERS) >= 200 and len(set(ANSWERS)) == len(ANSWERS)
    assert any("\n" in a for a in ANSWERS) and any(a.startswith("The answer is") for a in ANSWERS)


def test_pope_equals_eval_pope_on_the_closed_fixture():
    assert not _differences([pope.parse(a) for a in ANSWERS], CLOSED["pope"])


def test_mme_reading_equals_calculation_py_on_every_item():
    assert not _differences([mme.parse(a) for a in ANSWERS], CLOSED["mme"])


def test_mme_task_scores_equal_calculation_py():
    rows, official = CLOSED["mme_tasks"]["rows"], CLOSED["mme_tasks"]["scores"]
    qs = [{"question_id": str(i), "category": t, "image": img, "answer": g} for i, (t, img, g, _) in enumerate(rows)]
    got = mme.score(qs, {str(i): r[3] for i, r in enumerate(rows)})
    assert set(got["per_task"]) == set(official) and len(official) == 14
    for task, value in official.items():
        assert got["per_task"][task]["score"] == pytest.approx(value, abs=1e-9), task
    assert got["cognition"] == pytest.approx(sum(official[t] for t in mme.COGNITION))
    assert got["perception"] == pytest.approx(sum(v for t, v in official.items() if t not in mme.COGNITION))


def test_seed_equals_convert_seed_for_submission_on_every_item():
    golds = CLOSED["seed"]["answers"]
    ours = [[mcq.read_seed(a, ["dog", "cat", "cow", "hen"]) == g for g in golds] for a in ANSWERS]
    assert not _differences(ours, CLOSED["seed"]["right"])


def test_scienceqa_equals_eval_science_qa_on_every_item():
    ns = CLOSED["scienceqa"]["choices"]
    ours = [[mcq.read_scienceqa(a, [f"c{c}" for c in range(n)]) for n in ns] for a in ANSWERS]
    assert not _differences(ours, CLOSED["scienceqa"]["letters"])


def test_gqa_equals_llava_conversion_and_exact_match_on_every_item():
    golds = CLOSED["gqa"]["answers"]
    score = get_benchmark("gqa").score
    ours = [[score([{"question_id": "q", "answer": g}], {"q": a})["accuracy"] == 100.0 for g in golds] for a in ANSWERS]
    assert not _differences(ours, CLOSED["gqa"]["right"])
