"""The bootstrap's per-image statistics rebuild each scorer's headline exactly; intervals and tests
behave as their definitions say."""

import random

import numpy as np
import pytest

from htc_vlm.data import scenes as S
from htc_vlm.errors import HTCError
from htc_vlm.evaluation import bootstrap as B
from htc_vlm.evaluation.scorers import get_benchmark
from htc_vlm.evaluation.scorers.mcq import rotations

FAMILIES = {"open": "scenes_open", "pope_adversarial": "pope", "mme": "mme", "mc": "mmbench"}


def _noisy_predictions(rows, rng, p_right):
    """Right answers with probability p_right, else a plausible wrong or free-text answer."""
    wrong = {"yes": "no", "no": "yes"}
    out = {}
    for r in rows:
        a = r["answer"]
        if rng.random() < p_right:
            out[r["question_id"]] = rng.choice([a, a.capitalize() + ".", a]) if a not in "ABCD" else a
        else:
            out[r["question_id"]] = wrong.get(a, rng.choice(["B", "red", "2", "maybe", ""]))
    return out


@pytest.fixture(scope="module")
def families():
    qs = S.test_questions(S.sample_scenes("test", 60, 0, 48), seed=5)
    qs["mc"] = [r for row in qs["mc"] for r in rotations(row)]
    return qs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_summed_statistics_equal_the_scorer(families, family):
    bench = get_benchmark(FAMILIES[family])
    rows = families[family]
    for p in (0.0, 0.4, 0.9, 1.0):
        preds = _noisy_predictions(rows, random.Random(p), p)
        st = B.image_statistics(bench.name, rows, preds)
        assert float(st.metric(st.stats.sum(0))) == pytest.approx(bench.score(rows, preds)[bench.headline], abs=1e-9)


def test_interval_contains_the_mean_and_narrows_with_agreeing_seeds(families):
    rows = families["open"]
    runs = [B.image_statistics("scenes_open", rows, _noisy_predictions(rows, random.Random(s), 0.6)) for s in range(3)]
    ci = B.interval(runs, replicates=500)
    assert ci.low < ci.mean < ci.high
    one = B.interval(runs[:1], replicates=500)
    same = B.interval([runs[0]] * 3, replicates=500)  # three identical seeds: only the image noise is left
    assert same.high - same.low == pytest.approx(one.high - one.low, rel=0.25)
    perfect = B.image_statistics("scenes_open", rows, {r["question_id"]: r["answer"] for r in rows})
    assert B.interval([perfect], replicates=200).to_dict()["ci95"] == [100.0, 100.0]


def test_paired_difference_and_sign_flip(families):
    rows = families["open"]
    good = {r["question_id"]: r["answer"] for r in rows}
    bad = _noisy_predictions(rows, random.Random(1), 0.3)
    a, b = B.image_statistics("scenes_open", rows, good), B.image_statistics("scenes_open", rows, bad)
    d = B.paired_difference([a], [b], replicates=500)
    assert d["difference"] > 0 and d["ci95"][0] > 0 and d["p_bootstrap"] < 0.01
    assert B.paired_difference([a], [a], replicates=200)["difference"] == 0
    per_q = lambda preds: {r["question_id"]: float(preds[r["question_id"]] == r["answer"]) for r in rows}  # noqa: E731
    t = B.sign_flip_test(per_q(good), per_q(bad), permutations=2000)
    assert t["difference"] > 0 and t["p_sign_flip"] < 0.01
    # no difference: the p-value is large
    assert B.sign_flip_test(per_q(bad), per_q(bad), permutations=500)["p_sign_flip"] == 1.0


def test_errors_name_the_problem(families):
    rows = families["open"]
    with pytest.raises(HTCError, match="no prediction"):
        B.image_statistics("scenes_open", rows, {})
    with pytest.raises(HTCError, match="no bootstrap for benchmark 'gqa'"):
        B.image_statistics("gqa", rows, {})
    a = B.image_statistics("scenes_open", rows, {r["question_id"]: "x" for r in rows})
    b = B.image_statistics("scenes_open", rows[:10], {r["question_id"]: "x" for r in rows[:10]})
    with pytest.raises(HTCError, match="different test images"):
        B.interval([a, b])
    assert np.isfinite(B.interval([a], replicates=50).mean)
