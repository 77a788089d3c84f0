"""The ``vision`` stage: pre-train the embedded default's from-scratch vision tower.

Real VLMs start from a pretrained tower (CLIP); a language model trained on top of a random tower
learns to ignore the image (a trial here stayed at the image-blind loss for 1,000+ steps). We
pre-train by **dense attribute prediction** rather than contrastive image-caption training: the
scene generator knows what lies in every grid cell, so a linear read-out of *each patch token
alone* must give the shape, colour, texture and size of the object in the patch's cell (or
"empty") and the cell itself. That makes every patch token carry its own content and place,
which is what the language model's attention can look up; it converges in about a minute on
2 CPU cores, where contrastive training would need a text tower and large batches. (A first
version read all patches through one linear head: the tower then spread the information across
tokens, and the language model learned counting but not which object had which colour.)

Shape notation: B images, N patches, Dv tower width, A = 5 attributes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoModel

from ..data.images import load_rgb, to_tensor
from ..data.scenes import COLORS, GRID, SHAPES, SIZES, TEXTURES

# Object attributes have an extra class 0 = background; "cell" is the patch's grid cell.
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "texture": TEXTURES, "size": SIZES}
NUM_CLASSES = [len(v) + 1 for v in ATTRIBUTES.values()] + [GRID * GRID]


def patch_labels(objects: list[dict], image_size: int, patch_size: int) -> torch.Tensor:
    """(N, A) class ids per patch: the attributes of the object in the grid cell holding the patch
    centre (0 when the cell is empty), and that cell's index."""
    side = image_size // patch_size
    cell = image_size // GRID
    by_cell = {o["row"] * GRID + o["col"]: o for o in objects}
    labels = torch.zeros(side * side, len(NUM_CLASSES), dtype=torch.long)
    for r in range(side):
        for c in range(side):
            cy, cx = r * patch_size + patch_size // 2, c * patch_size + patch_size // 2
            k = min(cy // cell, GRID - 1) * GRID + min(cx // cell, GRID - 1)
            labels[r * side + c, -1] = k
            if k in by_cell:
                for a, (name, values) in enumerate(ATTRIBUTES.items()):
                    labels[r * side + c, a] = values.index(by_cell[k][name]) + 1
    return labels


class SceneAttributeDataset(Dataset):
    def __init__(self, scenes_jsonl: str | Path, images: str | Path, image_size: int, patch_size: int):
        self.rows = [json.loads(line) for line in Path(scenes_jsonl).read_text().splitlines() if line.strip()]
        self.images, self.size, self.patch = Path(images), image_size, patch_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        img = load_rgb(self.images / row["image"], self.size)
        return {"pixel_values": to_tensor(img), "labels": patch_labels(row["objects"], self.size, self.patch)}


class VisionPretrainModel(nn.Module):
    """The tower whose feature layer is read out per patch token: its first ``sum(NUM_CLASSES)``
    channels *are* the attribute logits (an identity read-out, no head).

    With a learned linear head the attributes ended up in directions a linear probe finds (colour
    0.99, shape 0.97 held out) but a from-scratch language model reads slowly: the model learned
    size, position and counting, then sat at chance on shape and, depending on the learning rate
    and the tower's seed, on colour. Writing the logits into the features themselves gives every
    attribute a large margin in the tokens the projector sees."""

    def __init__(self, vision_config, feature_layer: int = -1):
        super().__init__()
        if vision_config.hidden_size < sum(NUM_CLASSES):
            raise ValueError(f"the tower needs at least {sum(NUM_CLASSES)} channels for the attribute logits")
        self.tower = AutoModel.from_config(vision_config)
        self.feature_layer = feature_layer

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer][:, 1:]  # (B, N, Dv)
        logits = h[..., :sum(NUM_CLASSES)]  # (B, N, sum classes)
        out = {"logits": logits}
        if labels is not None:
            parts = logits.split(NUM_CLASSES, dim=-1)
            out["loss"] = sum(F.cross_entropy(p.flatten(0, 1), labels[..., a].flatten()) for a, p in enumerate(parts))
        return out

    @torch.no_grad()
    def accuracy(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Per attribute, the share of patches predicted right (shape, colour, texture, size, cell)."""
        parts = self.forward(pixel_values)["logits"].split(NUM_CLASSES, dim=-1)
        return [float((p.argmax(-1) == labels[..., a]).float().mean()) for a, p in enumerate(parts)]

    def save_tower(self, folder: str | Path) -> None:
        self.tower.save_pretrained(folder)
