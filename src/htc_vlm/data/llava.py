"""LLaVA-format data: conversation JSON + image folder (+ discrete feature store), a chat template
that puts the image block first, and a collator with labels on answers only.

The real LLaVA-665k and LLaVA-558k files load unchanged: records ``{"id", "image"?,
"conversations": [{"from": "human"|"gpt", "value"}...]}``, with ``<image>`` in one human turn when
an image is given. As LLaVA does, that ``<image>`` is moved to the start of its turn; here it then
expands to ``config.num_image_tokens`` placeholders followed by ``num_voco`` voco tokens.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..configuration import HTCConfig
from ..errors import HTCError
from ..layout import image_prompt_ids, left_pad
from .images import first_bad_image, image_under, load_rgb
from .records import Records
from .processor import ImageProcessing

IMAGE = "<image>"
IGNORE = -100


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation as LLaVA's ``SeparatorStyle.TWO`` writes it (llava/conversation.py)::

        {system}{sep}USER: <image>\n{q1}{sep}ASSISTANT: {a1}{sep2}USER: {q2}{sep}ASSISTANT: {a2}{sep2}

    ``sep2`` is the tokenizer's end-of-sequence token (``</s>``); the text is tokenized in two
    pieces around the image block, as LLaVA's ``tokenizer_image_token`` does, and the labels are the
    tokens of each answer and its ``sep2`` (LLaVA's ``preprocess_v1`` masking)."""

    system: str = ""
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "
    add_bos: bool = False
    image_newline: bool = False  # "<image>\n": a newline between the image block and the first question

    def head_text(self) -> str:
        return f"{self.system}{self.sep}{self.user}: " if self.system else f"{self.user}: "


TEMPLATES = {
    # The embedded default's: no system line, no BOS.
    "plain": ChatTemplate(),
    # LLaVA-1.5 / Vicuna v1.5 (llava/conversation.py conv_vicuna_v1).
    "vicuna_v1": ChatTemplate(
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.", add_bos=True, image_newline=True),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise HTCError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


class PromptBuilder:
    """Token ids of prompts and conversations for one tokenizer, template and model config.

    The text after the image block is tokenized as one piece (so a SentencePiece tokenizer sees the
    spaces and ``</s>`` boundaries exactly as in LLaVA's training), and labels are found from the
    tokens' character offsets, not from counting tokens of pieces."""

    def __init__(self, tokenizer, template: ChatTemplate, config: HTCConfig):
        self.tok, self.template, self.config = tokenizer, template, config
        self.eos_text = tokenizer.eos_token or ""
        self._seen: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}  # texts repeat across records

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character spans) of ``text``, no special tokens added."""
        if len(self._seen) > 100_000:  # a long-lived builder (a server) sees unbounded texts
            self._seen.clear()
        if text not in self._seen:
            if not text:
                self._seen[text] = ([], [])
            else:
                enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
                self._seen[text] = (enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]])
        ids, spans = self._seen[text]
        return list(ids), list(spans)

    def _ids(self, text: str) -> list[int]:
        return self._encode(text)[0]

    def prefix_ids(self) -> list[int]:
        """The question-independent text before the image block (cached with it)."""
        bos = [self.tok.bos_token_id] if self.template.add_bos else []
        return bos + self._ids(self.template.head_text())

    def _turn_text(self, question: str, first: bool, with_image: bool) -> str:
        t = self.template
        lead = ("\n" if t.image_newline and with_image else "") if first else f"{t.user}: "
        return f"{lead}{question.strip()}{t.sep}{t.assistant}:"

    def question_ids(self, question: str, first: bool = True, with_image: bool = True) -> list[int]:
        """A user turn up to the assistant tag; the first turn's user tag lives in the prefix. A later
        turn is tokenized after ``</s>``, as it follows the previous answer in a conversation."""
        text = self._turn_text(question, first, with_image)
        if first or not self.eos_text:
            return self._ids(text)
        ids, spans = self._encode(self.eos_text + text)
        return [i for i, (a, _) in zip(ids, spans) if a >= len(self.eos_text)]

    def prompt_ids(self, question: str, with_image: bool = True) -> list[int]:
        """A whole single-question prompt: prefix, image block + voco, question, assistant tag."""
        return self.head_ids(with_image) + self.question_ids(question, with_image=with_image)

    def turns_ids(self, turns: list[dict], name: str, with_image: bool = True) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the turns alone, as they follow the prompt head; labels only on answers
        and their end token."""
        text, answers = "", []  # answers: character spans [start, end) of each answer and its sep2
        for i in range(0, len(turns) - 1, 2):
            q, a = turns[i], turns[i + 1]
            if q.get("from") != "human" or a.get("from") != "gpt":
                raise HTCError(f"sample {name}: turns must alternate human / gpt, got {q.get('from')} / {a.get('from')}")
            text += self._turn_text(q["value"].replace(IMAGE, "").strip(), i == 0, with_image)
            start = len(text)  # the space after "ASSISTANT:" belongs to the answer (SentencePiece's "▁red")
            text += " " + a["value"].strip() + self.eos_text
            answers.append((start, len(text)))
        ids, spans = self._encode(text)
        labels = [i if any(s < b and a < e for a, b in answers) else IGNORE for i, (s, e) in zip(ids, spans)]
        return ids, labels

    def head_ids(self, with_image: bool) -> list[int]:
        return image_prompt_ids(self.config, self.prefix_ids()) if with_image else self.prefix_ids()

    def conversation(self, turns: list[dict], with_image: bool, name: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a conversation: the head (prefix, image block, voco), then the turns."""
        head = self.head_ids(with_image)
        ids, labels = self.turns_ids(turns, name, with_image)
        return head + ids, [IGNORE] * len(head) + labels


def check_record(rec: dict, name: str) -> None:
    if not isinstance(rec, dict):
        raise HTCError(f"sample {name}: not a JSON object")
    if "image" in rec and not (isinstance(rec["image"], str) and rec["image"]):
        raise HTCError(f"sample {name}: image field {rec['image']!r} is not a file name")
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
                 template: str = "plain", features=None, max_length: int = 2048,
                 processing: ImageProcessing | None = None, pack_by_image: bool = False):
        self.records = Records(json_path, check_record)  # each record checked; LLaVA-665k: indexed once
        self.images = Path(images)
        self.builder = PromptBuilder(tokenizer, get_template(template), config)
        self.config, self.features, self.max_length = config, features, max_length
        # how the images become pixels: the model's processor (its preprocessor_config.json)
        self.processing = processing or ImageProcessing.named(config.vision_config.image_size, config.image_norm)
        self.packed = pack_by_image
        needs_q = config.needs_latents
        if needs_q and features is None:
            raise HTCError(f"compression={config.compression!r} needs a discrete feature store (data.features)")
        names, image_of = self.records.images, self.records.image_of
        with_image = np.flatnonzero(image_of >= 0)
        first = with_image[np.unique(image_of[with_image], return_index=True)[1]]  # image k's first record

        def fail(k: int, why: str):
            i = int(first[k])
            raise HTCError(f"sample {self.records[i].get('id', i)!r} (record {i} of {json_path}): {why}")

        bad = self._check_images(names)
        if bad is not None:
            fail(*bad)
        if needs_q:
            missing = next((k for k, n in enumerate(names) if n not in features), None)
            if missing is not None:
                fail(missing, f"image id {names[missing]!r} is not in the feature store {features.path}")
        self.items = self._pack() if pack_by_image else [[i] for i in range(len(self.records))]

    def _check_images(self, names: list[str]) -> tuple[int, str] | None:
        """(index, error) of the first image that fails its header check, or None. For an indexed file
        the images that passed before, unchanged since (size, time, inode), are not opened again."""
        if self.records.cache is None:
            return first_bad_image(self.images, names, self.processing)
        key = hashlib.sha256(f"{self.images.resolve()}:{sorted(self.processing.to_dict().items())}".encode()).hexdigest()[:12]
        passed = self.records.passed_images(key)

        def identity(name):
            try:
                st = os.stat(self.images / name)
                return (st.st_size, st.st_mtime_ns, st.st_ino)
            except (OSError, ValueError):
                return None

        ids = [identity(n) for n in names]
        todo = [k for k, n in enumerate(names) if ids[k] is None or passed.get(n) != ids[k]]
        bad = first_bad_image(self.images, [names[k] for k in todo], self.processing)
        if bad is not None:
            return todo[bad[0]], bad[1]
        self.records.remember_passed(key, {n: ids[k] for k, n in enumerate(names)})
        return None

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
        words, image_of = self.records.words, self.records.image_of
        return [int(sum(words[r] for r in item)) + head * int(image_of[item[0]] >= 0) for item in self.items]

    def _image(self, rec: dict) -> dict:
        path = image_under(self.images, rec["image"])
        out = {"pixel_values": self.processing.pixels([self.processing.check(load_rgb(path), str(path))])[0]}
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
