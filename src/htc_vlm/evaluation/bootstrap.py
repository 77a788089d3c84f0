"""Confidence intervals for the benchmark scores: a bootstrap over test images and training seeds.

Questions about one image are not independent (MME pairs them on purpose), so the unit resampled is
the image: every scorer's headline metric is rebuilt from per-image *sufficient statistics* (for
VQA accuracy: the summed accuracy and the question count; for POPE: true / false positives and
negatives; for MME: per sub-task right answers, answers, images with both right, images; for MMBench:
circularly right questions and questions), so a replicate is one matrix product instead of a
re-scoring. ``image_statistics(...)`` summed over all images gives exactly what the scorer reports
(a test holds it to that).

A cell over several training seeds is the mean of the seeds' metrics; each bootstrap replicate draws
images with replacement (the same draw for every seed and, in :func:`paired_difference`, for both
methods: the same questions) and seeds with replacement, so the interval covers both the test-set
noise and the seed-to-seed spread.

Shape notation: I images, K statistics, S seeds, R replicates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import HTCError
from .scorers import mcq, mme, pope, vqa


@dataclass
class ImageStats:
    images: list[str]  # I image ids, the unit of resampling
    stats: np.ndarray  # (I, K)
    metric: Callable[[np.ndarray], np.ndarray]  # (..., K) summed statistics -> (...) headline metric


def _open(rows, preds) -> ImageStats:
    images = sorted({r["image"] for r in rows})
    at = {im: i for i, im in enumerate(images)}
    s = np.zeros((len(images), 2))
    for r in rows:
        s[at[r["image"]]] += (vqa.accuracy(preds[r["question_id"]], r.get("answers") or [r["answer"]]), 1)
    return ImageStats(images, s, lambda x: 100 * x[..., 0] / x[..., 1])


def _pope(rows, preds) -> ImageStats:
    if len({r.get("category") for r in rows}) > 1:
        raise HTCError("the bootstrap scores one POPE split at a time (the rows mix categories)")
    images = sorted({r["image"] for r in rows})
    at = {im: i for i, im in enumerate(images)}
    s = np.zeros((len(images), 3))  # tp, fp, fn
    for r in rows:
        p, g = pope.parse(preds[r["question_id"]]), r["answer"].strip().lower()
        s[at[r["image"]]] += (p == "yes" and g == "yes", p == "yes" and g == "no", p == "no" and g == "yes")

    def f1(x):
        tp, fp, fn = x[..., 0], x[..., 1], x[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(100 * 2 * tp / (2 * tp + fp + fn))
    return ImageStats(images, s, f1)


def _mme(rows, preds) -> ImageStats:
    tasks = sorted({r.get("category", "all") for r in rows})
    images = sorted({r["image"] for r in rows})
    at, t_at = {im: i for i, im in enumerate(images)}, {t: j for j, t in enumerate(tasks)}
    s = np.zeros((len(images), 4 * len(tasks)))  # per task: right, answers, images both right, images
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for r in rows:
        task = r.get("category", "all")
        right = mme.parse(preds[r["question_id"]]) == r["answer"].strip().lower()
        per_image[(r["image"], task)].append(right)
    for (im, task), rights in per_image.items():
        j = 4 * t_at[task]
        s[at[im], j:j + 4] += (sum(rights), len(rights), all(rights), 1)

    def perception(x):
        x = x.reshape(*x.shape[:-1], len(tasks), 4)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(100 * (x[..., 0] / x[..., 1] + x[..., 2] / x[..., 3])).sum(-1)
    return ImageStats(images, s, perception)


def _circular(rows, preds) -> ImageStats:
    groups: dict[str, list[bool]] = defaultdict(list)
    image_of = {}
    for r in rows:
        key = r.get("circular_of", r["question_id"])
        groups[key].append(mcq._right(r, preds[r["question_id"]]))
        image_of[key] = r["image"]
    images = sorted(set(image_of.values()))
    at = {im: i for i, im in enumerate(images)}
    s = np.zeros((len(images), 2))
    for key, rights in groups.items():
        s[at[image_of[key]]] += (all(rights), 1)
    return ImageStats(images, s, lambda x: 100 * x[..., 0] / x[..., 1])


STATISTICS = {"scenes_open": _open, "vqav2": _open, "textvqa": _open, "pope": _pope, "mme": _mme, "mmbench": _circular}


def image_statistics(benchmark: str, rows: list[dict], predictions: dict[str, str]) -> ImageStats:
    """Per-image sufficient statistics of ``benchmark``'s headline metric on answered ``rows``."""
    if benchmark not in STATISTICS:
        raise HTCError(f"no bootstrap for benchmark {benchmark!r}; supported: {', '.join(STATISTICS)}")
    missing = [r["question_id"] for r in rows if r["question_id"] not in predictions]
    if missing:
        raise HTCError(f"{len(missing)} questions have no prediction (first: {missing[0]!r})")
    return STATISTICS[benchmark](rows, predictions)


def _aligned(per_seed: list[ImageStats]) -> np.ndarray:
    """(S, I, K), checking every seed answered the same images."""
    if not per_seed:
        raise HTCError("no runs to bootstrap")
    first = per_seed[0].images
    for st in per_seed[1:]:
        if st.images != first:
            raise HTCError("the runs of one cell answered different test images")
    return np.stack([st.stats for st in per_seed])


def _replicate_metrics(per_seed: list[ImageStats], weights: np.ndarray, seed_draws: np.ndarray) -> np.ndarray:
    """(R,) the mean over each replicate's drawn seeds of the metric on its drawn images."""
    stats = _aligned(per_seed)  # (S, I, K)
    summed = np.einsum("ri,sik->rsk", weights, stats)  # (R, S, K)
    metric = per_seed[0].metric(summed)  # (R, S)
    return np.take_along_axis(metric, seed_draws, axis=1).mean(1)


@dataclass
class Interval:
    mean: float  # mean over seeds of the metric on all test images
    low: float
    high: float
    seeds: int

    def to_dict(self) -> dict:
        return {"mean": round(self.mean, 2), "ci95": [round(self.low, 2), round(self.high, 2)], "seeds": self.seeds}


def _draws(n_images: int, n_seeds: int, replicates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=replicates).astype(float)  # (R, I)
    return weights, rng.integers(0, n_seeds, size=(replicates, n_seeds))  # (R, S)


def interval(per_seed: list[ImageStats], replicates: int = 2000, seed: int = 0) -> Interval:
    """Mean over seeds and its 95% percentile interval (bootstrap over images and seeds)."""
    stats = _aligned(per_seed)
    point = float(per_seed[0].metric(stats.sum(1)).mean())
    w, s = _draws(stats.shape[1], stats.shape[0], replicates, seed)
    reps = _replicate_metrics(per_seed, w, s)
    return Interval(point, float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5)), len(per_seed))


def paired_difference(a: list[ImageStats], b: list[ImageStats], replicates: int = 2000, seed: int = 0) -> dict:
    """A - B over the same test images: the mean difference, its 95% interval (images drawn once per
    replicate for both; each method's seeds drawn separately), and the two-sided bootstrap p-value
    (twice the smaller share of replicates on either side of 0)."""
    sa, sb = _aligned(a), _aligned(b)
    if a[0].images != b[0].images:
        raise HTCError("the two methods answered different test images")
    point = float(a[0].metric(sa.sum(1)).mean() - b[0].metric(sb.sum(1)).mean())
    w, draws_a = _draws(sa.shape[1], sa.shape[0], replicates, seed)
    draws_b = np.random.default_rng(seed + 1).integers(0, sb.shape[0], size=(replicates, sb.shape[0]))
    diff = _replicate_metrics(a, w, draws_a) - _replicate_metrics(b, w, draws_b)
    p = min(1.0, 2 * min(float((diff <= 0).mean()), float((diff >= 0).mean())))
    return {"difference": round(point, 2), "ci95": [round(float(np.percentile(diff, 2.5)), 2),
            round(float(np.percentile(diff, 97.5)), 2)], "p_bootstrap": round(p, 4),
            "seeds": [len(a), len(b)]}


def sign_flip_test(a: dict[str, float], b: dict[str, float], permutations: int = 20000, seed: int = 0) -> dict:
    """The paired test on the same questions: per-question scores of A and B (each averaged over its
    seeds), a permutation test that flips the sign of each question's difference at random. Returns
    the mean difference (points) and the two-sided p-value."""
    keys = sorted(set(a) & set(b))
    if len(keys) != len(a) or len(keys) != len(b):
        raise HTCError("the paired test needs the same questions answered by both methods")
    d = 100 * (np.array([a[k] for k in keys]) - np.array([b[k] for k in keys]))  # (Q,)
    observed = d.mean()
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(permutations, len(d)))
    null = (signs * d).mean(1)
    p = (1 + int((np.abs(null) >= abs(observed) - 1e-12).sum())) / (permutations + 1)
    return {"difference": round(float(observed), 2), "p_sign_flip": round(p, 4), "questions": len(d)}
