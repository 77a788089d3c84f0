"""Table 3 analog: linear probes on frozen representations of a trained HTC model.

Representations (each a D-vector per image):
- ``z_voco``: the language model's last hidden state at the voco position (the paper's z_voco);
- ``anchors_mean``: the mean of the discrete anchors P_d(q) (the paper's v_d, pooled);
- ``patches_mean``: the mean of the projected patch tokens (the paper's V-bar, pooled).
The paper passes the pooled v_d and V-bar through voco encoding before probing; we probe them as
they enter the language model, which is the cleaner test of what each channel carries.

Labels come from the scene generator, per image: semantic (S) = number of objects and the shape
of the first object in raster order; detail (D) = that object's colour and texture. A multinomial
logistic regression is fit on the train split's images and scored (top-1) on the test split's.

Shape notation: M images, D width.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.scenes import COLORS, SHAPES, TEXTURES, read_jsonl
from ..inference import ImageEncoder
from ..layout import image_prompt_ids

LABELS = {  # name -> (tag, function of a scene row -> class id)
    "count": ("semantic", lambda s: len(s["objects"]) - 1),
    "shape": ("semantic", lambda s: SHAPES.index(_first(s)["shape"])),
    "colour": ("detail", lambda s: list(COLORS).index(_first(s)["color"])),
    "texture": ("detail", lambda s: TEXTURES.index(_first(s)["texture"])),
}


def _first(scene: dict) -> dict:
    return min(scene["objects"], key=lambda o: (o["row"], o["col"]))


@torch.no_grad()
def representations(model, encoder: ImageEncoder, images: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """``{name: (M, D)}`` for the images (ids below the encoder's root)."""
    c = model.config
    out: dict[str, list[torch.Tensor]] = {"z_voco": [], "patches_mean": []}
    if model.model.has_anchors:
        out["anchors_mean"] = []
    voco_pos = len(image_prompt_ids(c)) - c.num_voco  # first voco position
    for s in range(0, len(images), batch):
        pix, q = encoder.batch(images[s:s + batch])
        _, lm_out = model.image_prefill(pix, q)
        out["z_voco"].append(lm_out.last_hidden_state[:, voco_pos])
        out["patches_mean"].append(model.model.patch_embeddings(pix).mean(1))
        if "anchors_mean" in out:
            out["anchors_mean"].append(model.model.discrete_anchors(q).mean(1))
    return {k: torch.cat(v).float() for k, v in out.items()}


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              steps: int = 300, seed: int = 0) -> float:
    """Top-1 test accuracy of a standardised multinomial logistic regression."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    k = int(max(y_train.max(), y_test.max())) + 1
    w = (torch.randn(xtr.shape[1], k, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            (F.cross_entropy(xtr @ w + b, y_train) + 1e-3 * w.pow(2).sum()).backward()
            opt.step()
    return float(((xte @ w + b).argmax(-1) == y_test).float().mean())


def probe_model(model, encoder: ImageEncoder, train_scenes: Path, test_scenes: Path, max_train: int = 2000) -> dict:
    """``{representation: {label: accuracy, "semantic": mean, "detail": mean}}`` (accuracies in %)."""
    tr = read_jsonl(train_scenes)[:max_train]
    te = read_jsonl(test_scenes)
    rtr = representations(model, encoder, [s["image"] for s in tr])
    rte = representations(model, encoder, [s["image"] for s in te])
    result = {}
    for name in rtr:
        row = {}
        for label, (_, fn) in LABELS.items():
            ytr = torch.tensor([fn(s) for s in tr])
            yte = torch.tensor([fn(s) for s in te])
            row[label] = round(100 * fit_probe(rtr[name], ytr, rte[name], yte), 2)
        for tag in ("semantic", "detail"):
            vals = [row[lab] for lab, (t, _) in LABELS.items() if t == tag]
            row[tag] = round(sum(vals) / len(vals), 2)
        result[name] = row
    return result
