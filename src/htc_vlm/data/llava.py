"""LLaVA-format data: conversation JSON + image folder (+ discrete feature store), a chat template
that puts the image block first, and a collator with labels on answers only.

The real LLaVA-665k and LLaVA-558k files load unchanged: records ``{"id", "image"?,
"conversations": [{"from": "human"|"gpt", "value"}...]}``, with ``<image>`` in one human turn when
an image is given. As LLaVA does, that ``<image>`` is moved to the start of its turn; here it then
expands to ``config.num_image_tokens`` placeholders followed by ``num_voco`` voco tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..configuration import HTCConfig
from ..errors import HTCError
from ..layout import image_prompt_ids, left_pad
from .images import CLIP_MEAN, CLIP_STD, load_rgb, to_tensor

IMAGE = "<image>"
IGNORE = -100


@dataclass(frozen=True)
class ChatTemplate:
    """``{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`` (Vicuna v1)."""

    system: str = ""
    user: str = "USER:"
    assistant: str = "ASSISTANT:"
    add_bos: bool = False


TEMPLATES = {
    "plain": ChatTemplate(),
    "vicuna_v1": ChatTemplate(
        system="A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions.", add_bos=True),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise HTCError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


class PromptBuilder:
    """Token ids of prompts and conversations for one tokenizer, template and model config."""

    def __init__(self, tokenizer, template: ChatTemplate, config: HTCConfig):
        self.tok, self.template, self.config = tokenizer, template, config

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def prefix_ids(self) -> list[int]:
        """The question-independent text before the image block (cached with it)."""
        bos = [self.tok.bos_token_id] if self.template.add_bos else []
        return bos + self._ids(f"{self.template.system} {self.template.user}".strip())

    def question_ids(self, question: str, first: bool = True) -> list[int]:
        """A user turn up to the assistant tag; the first turn's user tag lives in the prefix."""
        user = "" if first else f"{self.template.user} "
        return self._ids(f"{user}{question.strip()} {self.template.assistant}")

    def prompt_ids(self, question: str, with_image: bool = True) -> list[int]:
        """A whole single-question prompt: prefix, image block + voco, question, assistant tag."""
        head = image_prompt_ids(self.config, self.prefix_ids()) if with_image else self.prefix_ids()
        return head + self.question_ids(question)

    def conversation(self, turns: list[dict], with_image: bool, name: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a conversation; labels only on answers and their end token."""
        ids = image_prompt_ids(self.config, self.prefix_ids()) if with_image else self.prefix_ids()
        labels = [IGNORE] * len(ids)
        for i in range(0, len(turns) - 1, 2):
            q, a = turns[i], turns[i + 1]
            if q.get("from") != "human" or a.get("from") != "gpt":
                raise HTCError(f"sample {name}: turns must alternate human / gpt, got {q.get('from')} / {a.get('from')}")
            qi = self.question_ids(q["value"].replace(IMAGE, "").strip(), first=i == 0)
            ai = self._ids(" " + a["value"].strip()) + [self.tok.eos_token_id]
            ids += qi + ai
            labels += [IGNORE] * len(qi) + ai
        return ids, labels


def check_record(rec: dict, name: str) -> None:
    turns = rec.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise HTCError(f"sample {name}: needs a 'conversations' list of at least one human / gpt pair")
    n_img = sum(t.get("value", "").count(IMAGE) for t in turns)
    if "image" in rec and n_img != 1:
        raise HTCError(f"sample {name}: has an image but {n_img} {IMAGE} tokens in its conversation (expected 1)")
    if "image" not in rec and n_img:
        raise HTCError(f"sample {name}: has {IMAGE} in its conversation but no 'image' field")


class LlavaDataset(Dataset):
    """One item per record: ``input_ids``, ``labels``, and ``pixel_values`` / ``discrete_latents``.

    Everything checkable is checked when the dataset is built, so a bad sample stops a run before
    its first step with an error naming it: record layout, image files, feature-store ids.
    """

    def __init__(self, json_path: str | Path, images: str | Path, tokenizer, config: HTCConfig,
                 template: str = "plain", features=None, max_length: int = 2048, image_norm: str = "half",
                 resize: bool = False):
        self.records = json.loads(Path(json_path).read_text())
        self.images = Path(images)
        self.builder = PromptBuilder(tokenizer, get_template(template), config)
        self.config, self.features, self.max_length = config, features, max_length
        self.norm = (CLIP_MEAN, CLIP_STD) if image_norm == "clip" else ((0.5,) * 3, (0.5,) * 3)
        self.resize = resize
        needs_q = config.compression in ("htc", "discrete")
        if needs_q and features is None:
            raise HTCError(f"compression={config.compression!r} needs a discrete feature store (data.features)")
        for i, rec in enumerate(self.records):
            name = f"{rec.get('id', i)!r} (record {i} of {json_path})"
            check_record(rec, name)
            if "image" in rec:
                if not (self.images / rec["image"]).is_file():
                    raise HTCError(f"sample {name}: image file {self.images / rec['image']} not found")
                if needs_q and rec["image"] not in features:
                    raise HTCError(f"sample {name}: image id {rec['image']!r} is not in the feature store {features.path}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        has_image = "image" in rec
        ids, labels = self.builder.conversation(rec["conversations"], has_image, repr(rec.get("id", i)))
        if len(ids) > self.max_length:
            n_head = len(image_prompt_ids(self.config, self.builder.prefix_ids()))
            if self.max_length <= n_head:
                raise HTCError(f"max_length {self.max_length} is shorter than the image block ({n_head} tokens)")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if has_image:
            size = self.config.vision_config.image_size
            img = load_rgb(self.images / rec["image"], size, resize=self.resize)
            item["pixel_values"] = to_tensor(img, *self.norm)
            if self.features is not None and self.config.compression in ("htc", "discrete"):
                item["discrete_latents"] = self.features[rec["image"]]
        return item


@dataclass
class Collator:
    """Left-pads a batch (the layout the model and generation use); images stacked in order."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        ids, mask = left_pad([x["input_ids"].tolist() for x in items], self.pad_token_id)
        labels, _ = left_pad([x["labels"].tolist() for x in items], IGNORE)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        for key in ("pixel_values", "discrete_latents"):
            vals = [x[key] for x in items if key in x]
            if vals:
                batch[key] = torch.stack(vals)
        return batch
