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
from .images import check_header, image_under, load_rgb, norm_stats, to_tensor

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
        self._seen: dict[str, list[int]] = {}  # questions and answers repeat across records

    def _ids(self, text: str) -> list[int]:
        if len(self._seen) > 100_000:  # a long-lived builder (a server) sees unbounded texts
            self._seen.clear()
        if text not in self._seen:
            self._seen[text] = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        return list(self._seen[text])

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
        return self.head_ids(with_image) + self.question_ids(question)

    def turns_ids(self, turns: list[dict], name: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the turns alone, as they follow the prompt head; labels only on answers
        and their end token."""
        ids, labels = [], []
        for i in range(0, len(turns) - 1, 2):
            q, a = turns[i], turns[i + 1]
            if q.get("from") != "human" or a.get("from") != "gpt":
                raise HTCError(f"sample {name}: turns must alternate human / gpt, got {q.get('from')} / {a.get('from')}")
            qi = self.question_ids(q["value"].replace(IMAGE, "").strip(), first=i == 0)
            ai = self._ids(" " + a["value"].strip()) + [self.tok.eos_token_id]
            ids += qi + ai
            labels += [IGNORE] * len(qi) + ai
        return ids, labels

    def head_ids(self, with_image: bool) -> list[int]:
        return image_prompt_ids(self.config, self.prefix_ids()) if with_image else self.prefix_ids()

    def conversation(self, turns: list[dict], with_image: bool, name: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a conversation: the head (prefix, image block, voco), then the turns."""
        head = self.head_ids(with_image)
        ids, labels = self.turns_ids(turns, name)
        return head + ids, [IGNORE] * len(head) + labels


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
    """Items of ``input_ids``, ``labels``, and ``pixel_values`` / ``discrete_latents``.

    ``pack_by_image=False``: one item per record. ``pack_by_image=True``: the records of one image
    become one item, ``[head] [record 1] [record 2] ...``, where every record sees the head (prefix,
    image block, voco) and itself but not the other records, and its RoPE positions restart after the
    head: each record is computed exactly as if it were alone (``segment_ids`` and ``position_ids``
    tell the model; a test checks the logits against unpacked records). The image block is then built
    and run once for all the questions about that image, so an epoch costs about half as much for
    LLaVA-665k-style data with several single-question records per image.

    Everything checkable is checked when the dataset is built, so a bad sample stops a run before
    its first step with an error naming it: record layout, image files, feature-store ids.
    """

    def __init__(self, json_path: str | Path, images: str | Path, tokenizer, config: HTCConfig,
                 template: str = "plain", features=None, max_length: int = 2048, image_norm: str = "half",
                 resize: bool = False, pack_by_image: bool = False):
        self.records = json.loads(Path(json_path).read_text())
        self.images = Path(images)
        self.builder = PromptBuilder(tokenizer, get_template(template), config)
        self.config, self.features, self.max_length = config, features, max_length
        self.norm = norm_stats(image_norm)
        self.resize, self.packed = resize, pack_by_image
        needs_q = config.needs_latents
        if needs_q and features is None:
            raise HTCError(f"compression={config.compression!r} needs a discrete feature store (data.features)")
        found: set[str] = set()
        for i, rec in enumerate(self.records):
            name = f"{rec.get('id', i)!r} (record {i} of {json_path})"
            check_record(rec, name)
            if "image" in rec and rec["image"] not in found:
                found.add(rec["image"])
                try:
                    check_header(image_under(self.images, rec["image"]), config.vision_config.image_size, resize)
                except HTCError as e:
                    raise HTCError(f"sample {name}: {e}") from e
                if needs_q and rec["image"] not in features:
                    raise HTCError(f"sample {name}: image id {rec['image']!r} is not in the feature store {features.path}")
        self.items = self._pack() if pack_by_image else [[i] for i in range(len(self.records))]

    def _pack(self) -> list[list[int]]:
        """Record indices per item: records of one image together (in file order, a new item whenever
        ``max_length`` would be passed); records without an image alone."""
        items: list[list[int]] = []
        open_item: dict[str, tuple[list[int], int]] = {}  # image -> (its last item, that item's length)
        head = len(self.builder.head_ids(True))
        for i, rec in enumerate(self.records):
            if "image" not in rec:
                items.append([i])
                continue
            n = len(self.builder.turns_ids(rec["conversations"], repr(rec.get("id", i)))[0])
            item, length = open_item.get(rec["image"], (None, 0))
            if item is None or length + n > self.max_length:
                item, length = [], head
                items.append(item)
            item.append(i)
            open_item[rec["image"]] = (item, length + n)
        return items

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Approximate lengths (words of every turn, plus the image block) for length-grouped batches,
        computed without loading an image."""
        head = len(self.builder.head_ids(True))
        return [sum(len(t.get("value", "").split()) for r in item for t in self.records[r]["conversations"])
                + head * ("image" in self.records[item[0]]) for item in self.items]

    def _image(self, rec: dict) -> dict:
        size = self.config.vision_config.image_size
        out = {"pixel_values": to_tensor(load_rgb(image_under(self.images, rec["image"]), size, resize=self.resize), *self.norm)}
        if self.features is not None and self.config.needs_latents:
            out["discrete_latents"] = self.features[rec["image"]]
        return out

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        rec = self.records[item[0]]
        has_image = "image" in rec
        head = self.builder.head_ids(has_image)
        ids, labels, segments, pos = list(head), [IGNORE] * len(head), [0] * len(head), list(range(len(head)))
        for seg, r in enumerate(item, start=1):  # segment 0 = the head, seen by every record
            t_ids, t_labels = self.builder.turns_ids(self.records[r]["conversations"], repr(self.records[r].get("id", r)))
            ids += t_ids
            labels += t_labels
            segments += [seg] * len(t_ids)
            pos += range(len(head), len(head) + len(t_ids))
        n = self.max_length  # packed: only a lone record can pass it (_pack starts new items before)
        if len(ids) > n:
            n_head = len(self.builder.head_ids(True))
            if n <= n_head:
                raise HTCError(f"max_length {n} is shorter than the image block ({n_head} tokens)")
        out = {"input_ids": torch.tensor(ids[:n]), "labels": torch.tensor(labels[:n])}
        if self.packed:
            out |= {"segment_ids": torch.tensor(segments[:n]), "position_ids": torch.tensor(pos[:n])}
        return out | (self._image(rec) if has_image else {})


@dataclass
class Collator:
    """Left-pads a batch (the layout the model and generation use); images stacked in order."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        ids, mask = left_pad([x["input_ids"].tolist() for x in items], self.pad_token_id)
        labels, _ = left_pad([x["labels"].tolist() for x in items], IGNORE)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        for key in ("segment_ids", "position_ids"):  # packed items (LlavaDataset(pack_by_image=True))
            if key in items[0]:
                batch[key] = left_pad([x[key].tolist() for x in items], 0)[0]
        for key in ("pixel_values", "discrete_latents"):
            vals = [x[key] for x in items if key in x]
            if vals:
                batch[key] = torch.stack(vals)
        return batch
