import json

import pytest

from htc_vlm import HTCError
from htc_vlm.evaluation.retention import markdown, retention, table
from htc_vlm.evaluation.scorers import get_benchmark, gqa, mcq, mme, pope, vqa

# ---------------------------------------------------------------------- VQAv2


@pytest.mark.parametrize("pred, ref", [("two", "2"), ("a dog", "dog"), ("Yes.", "yes"), ("the Red one", "red one"),
                                       ("dont", "don't"), ("3,000", "3000"), ("ten", "10")])
def test_vqa_normalisation_matches(pred, ref):
    assert vqa.accuracy(pred, [ref]) == 1.0


def test_vqa_leave_one_out_accuracy():
    refs = ["2"] * 3 + ["3"] * 7
    # a "2" left out leaves 2 matches (2/3); a "3" left out leaves 3 (1): (3 * 2/3 + 7 * 1) / 10
    assert vqa.accuracy("two", refs) == pytest.approx(0.9)
    assert vqa.accuracy("3", refs) == 1.0
    assert vqa.accuracy("4", refs) == 0.0
    assert vqa.accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3 * 0 + 0.9 * (1 / 3))
    qs = [{"question_id": "a", "answers": refs}, {"question_id": "b", "answer": "cat"}]
    assert vqa.score(qs, {"a": "3", "b": "Cat."})["accuracy"] == 100.0


def test_gqa_exact_match_after_normalisation():
    qs = [{"question_id": "1", "answer": "left"}, {"question_id": "2", "answer": "blue"}]
    assert gqa.score(qs, {"1": "Left.", "2": "light blue"})["accuracy"] == 50.0


@pytest.mark.parametrize("pred, right", [
    ("left", True), ("Left", True), ("LEFT...", True), (" left. ", True), ("left!", False), ("the left", False),
    ("Left side", False), ("left,", False), ("", False), ("left\nright", False), ("lEfT.", True), ("left .", False),
])
def test_gqa_follows_llava_convert_gqa_for_eval(pred, right):
    """rstrip('.') and lower() on the stripped answer, then exact match: articles, other punctuation
    and number words are not normalised (LLaVA's scripts/convert_gqa_for_eval.py + GQA eval.py)."""
    assert (gqa.score([{"question_id": "1", "answer": "left"}], {"1": pred})["accuracy"] == 100.0) is right
    assert gqa.score([{"question_id": "1", "answer": "2"}], {"1": "two"})["accuracy"] == 0.0


# ---------------------------------------------------------------------- POPE


def test_pope_parsing_and_metrics():
    assert pope.parse("Yes, there is a dog in the image.") == "yes"
    assert pope.parse("No.") == "no"
    assert pope.parse("There is not a dog.") == "no"
    assert pope.parse("I see a dog. No cat.") == "yes"  # only the first sentence counts
    qs = [{"question_id": str(i), "answer": a} for i, a in enumerate(["yes", "yes", "no", "no"])]
    m = pope.score(qs, {"0": "Yes", "1": "no", "2": "yes", "3": "No"})
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (50.0, 50.0, 50.0, 50.0, 50.0)


# ---------------------------------------------------------------------- MME


def test_mme_acc_plus_needs_both_answers_of_an_image():
    qs = [{"question_id": "1", "image": "a", "answer": "yes", "category": "color"},
          {"question_id": "2", "image": "a", "answer": "no", "category": "color"},
          {"question_id": "3", "image": "b", "answer": "yes", "category": "color"},
          {"question_id": "4", "image": "b", "answer": "no", "category": "color"}]
    m = mme.score(qs, {"1": "Yes", "2": "yes", "3": "yes", "4": "No, it is not."})
    t = m["per_task"]["color"]
    assert (t["acc"], t["acc_plus"], t["score"]) == (75.0, 50.0, 125.0)
    assert m["perception"] == 125.0 and m["cognition"] == 0
    assert mme.parse("maybe") == "other"
    # cognition sub-tasks are reported apart, as calculation.py does; they never add to perception
    cog = [q | {"question_id": "c" + q["question_id"], "category": "code_reasoning"} for q in qs]
    m = mme.score(qs + cog, {"1": "Yes", "2": "yes", "3": "yes", "4": "No, it is not.",
                             "c1": "yes", "c2": "no", "c3": "yes", "c4": "no"})
    assert m["perception"] == 125.0 and m["cognition"] == 200.0


# ---------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("text, letter", [("B", "B"), ("(C) a dog", "C"), ("B. cat", "B"), ("The answer is D.", "D"),
                                          ("I think it is a cat", "B"), ("no idea", None)])
def test_mc_option_extraction(text, letter):
    assert mcq.extract(text, ["dog", "cat", "cow", "hen"]) == letter


def test_circular_evaluation_needs_every_rotation_right():
    row = {"question_id": "q", "image": "i", "question": "?", "options": ["w", "x", "y", "z"], "answer": "C"}
    rots = mcq.rotations(row)
    assert [r["options"][mcq.LETTERS.index(r["answer"])] for r in rots] == ["y"] * 4
    right = {r["question_id"]: r["answer"] for r in rots}
    assert mcq.score_circular(rots, right)["circular_accuracy"] == 100.0
    one_wrong = right | {rots[2]["question_id"]: "A" if rots[2]["answer"] != "A" else "B"}
    m = mcq.score_circular(rots, one_wrong)
    assert m["circular_accuracy"] == 0.0 and m["accuracy"] == 100.0  # the unrotated question alone was right


def test_unknown_benchmark():
    with pytest.raises(HTCError, match="unknown benchmark 'coco'"):
        get_benchmark("coco")


# ---------------------------------------------------------------------- retention on the paper's Table 1

PAPER = {  # GQA, VQAv2, MMBench, MME, POPE, SEED, SQA-I
    "upper": [61.1, 77.7, 64.0, 1487.2, 85.0, 57.9, 66.5],
    "lower": [37.7, 41.2, 22.3, 617.3, 53.9, 36.9, 60.7],
    "VoCo-LLaMA": [57.4, 71.8, 57.9, 1241.4, 81.5, 48.8, 66.3],
    "HTC-VLM": [57.6, 72.4, 60.0, 1265.2, 82.8, 49.8, 67.7],
    "Avg. Pool": [52.9, 65.0, 55.5, 1210.3, 79.1, 50.3, 62.2],
}
BENCHES = ["gqa", "vqav2", "mmbench", "mme", "pope", "seed", "scienceqa_img"]


def test_retention_reproduces_the_papers_table_1():
    rows = {k: dict(zip(BENCHES, v)) for k, v in PAPER.items()}
    t = table(rows.pop("upper"), rows.pop("lower"), rows)
    assert round(t["rows"]["HTC-VLM"]["avg"], 1) == 87.2
    assert round(t["rows"]["VoCo-LLaMA"]["avg"], 1) == 81.0
    assert round(t["rows"]["Avg. Pool"]["avg"], 1) == 64.1
    assert round(t["rows"]["HTC-VLM"]["scienceqa_img"]["retention"], 1) == 120.7
    assert round(t["rows"]["HTC-VLM"]["mme"]["retention"], 1) == 74.5
    assert t["rows"]["upper"]["avg"] == 100.0 and t["rows"]["lower"]["avg"] == 0.0
    assert "| HTC-VLM | 57.6 (85.0%)" in markdown(t)
    with pytest.raises(HTCError, match="undefined"):
        retention(1.0, 2.0, 2.0)


def test_retention_cli(tmp_path, capsys):
    from htc_vlm.cli import main

    def write(name, method, scores):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"method": method, "scores": scores}))
        return str(p)

    u = write("u", "upper", {"gqa": 60.0, "pope": 80.0})
    lo = write("l", "lower", {"gqa": 40.0, "pope": 50.0})
    h = write("h", "htc", {"gqa": 55.0, "pope": 77.0})
    assert main(["retention", "--upper", u, "--lower", lo, h, "--out", str(tmp_path / "t.json")]) == 0
    assert "| htc | 55.0 (75.0%) | 77.0 (90.0%) | 82.5 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["rows"]["htc"]["avg"] == 82.5


# ---------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def tiny_model_dir(make_model_dir):
    return make_model_dir("voco")


def _eval(model_dir, scenes_dir, out, family="open", benchmark="scenes_open", questions=None):
    from htc_vlm.cli import main

    return main(["eval", "--model", str(model_dir), "--benchmark", benchmark, "--questions",
                 str(questions or scenes_dir / "test" / f"{family}.jsonl"), "--images", str(scenes_dir / "images"),
                 "--out", str(out), "--batch-size", "8"])


def test_runner_writes_predictions_and_metrics_and_resumes(tiny_model_dir, scenes_dir, tmp_path):
    out = tmp_path / "ev"
    assert _eval(tiny_model_dir, scenes_dir, out) == 0
    preds = (out / "predictions.jsonl").read_text().splitlines()
    n = len((scenes_dir / "test" / "open.jsonl").read_text().splitlines())
    assert len(preds) == n
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"scenes_open"}
    # the score is the VQA accuracy of the written predictions, recomputed here from the two files
    answers = {q["question_id"]: q["answer"] for q in map(json.loads, (scenes_dir / "test" / "open.jsonl").read_text().splitlines())}
    by_id = {p["question_id"]: p["prediction"] for p in map(json.loads, preds)}
    expected = 100 * sum(vqa.accuracy(by_id[i], [a]) for i, a in answers.items()) / len(answers)
    assert metrics["scores"]["scenes_open"] == pytest.approx(expected)
    # a crash after some batches: the answered ids are kept, only the rest is answered again
    (out / "predictions.jsonl").write_text("\n".join(preds[:5]) + "\n" + preds[5][:10])
    assert _eval(tiny_model_dir, scenes_dir, out) == 0
    again = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in again if line.endswith("}")][:5] == \
           [json.loads(p)["question_id"] for p in preds[:5]]
    assert json.loads((out / "metrics.json").read_text())["scores"] == metrics["scores"]  # deterministic answers


def test_runner_bad_inputs(tiny_model_dir, scenes_dir, tmp_path, capsys):
    rows = (scenes_dir / "test" / "open.jsonl").read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([rows[0], rows[1], rows[0]]) + "\n")
    assert _eval(tiny_model_dir, scenes_dir, tmp_path / "a", questions=dup) == 2
    assert "dup.jsonl:3: duplicate question_id 'open-000000' (first on line 1)" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(json.loads(rows[0]) | {"image": "nope.png"}) + "\n")
    assert _eval(tiny_model_dir, scenes_dir, tmp_path / "b", questions=missing) == 2
    assert "question 'open-000000': image" in capsys.readouterr().err
    assert _eval(tiny_model_dir, scenes_dir, tmp_path / "c", benchmark="coco") == 2
    assert _eval(tiny_model_dir, scenes_dir, tmp_path / "d") == 0
    assert _eval(tiny_model_dir, scenes_dir, tmp_path / "d", family="pope_random", benchmark="pope") == 2
    assert "holds predictions for benchmark 'scenes_open', not 'pope'" in capsys.readouterr().err


def test_mc_by_likelihood_and_circular(tiny_model_dir, scenes_dir, tmp_path):
    from htc_vlm.cli import main

    out = tmp_path / "mc"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", "mmbench", "--questions",
            str(scenes_dir / "test" / "mc.jsonl"), "--images", str(scenes_dir / "images"), "--out", str(out)]
    assert main(args + ["--likelihood"]) == 0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    n = len((scenes_dir / "test" / "mc.jsonl").read_text().splitlines())
    assert len(preds) == 4 * n and {p["prediction"] for p in preds} <= set("ABCD")
    assert "circular_accuracy" in json.loads((out / "metrics.json").read_text())["metrics"]


def test_mc_errors_tells_a_wrong_text_from_a_wrong_lookup():
    """benchmarks/mc_errors.py: per rotated answer, is the text the right option's, does the letter name
    the option of the model's own text, is the letter right (as the circular scorer reads it)."""
    from helpers import benchmark_script

    split_errors = benchmark_script("mc_errors").split_errors
    q = {"question_id": "q", "options": ["red", "blue", "green", "pink"], "answer": "C"}  # green
    # rotations put green at C, B, A, D (red at A, D, C, B); the answers: right; right text, wrong letter;
    # wrong text with its own letter; a right letter with no text
    preds = {"q@r0": "green C", "q@r1": "green C", "q@r2": "red C", "q@r3": "D"}
    assert split_errors([q], preds) == {"text_right": 50.0, "letter_of_own_text": 50.0, "letter_right": 50.0, "n": 4}
    # by kind: each template's questions alone
    count = {"question_id": "c", "options": ["1", "2", "3", "4"], "answer": "B", "template": "mc/count"}
    preds |= {f"c@r{i}": f"2 {'BADC'[i]}" for i in range(4)}  # "2" sits at B, A, D, C
    kinds = benchmark_script("mc_errors").by_kind([q | {"template": "mc/color"}, count], preds)
    assert kinds == {"mc/color": split_errors([q], preds),
                     "mc/count": {"text_right": 100.0, "letter_of_own_text": 100.0, "letter_right": 100.0, "n": 4}}
