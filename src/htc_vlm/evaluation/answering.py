"""Answering question files through the :class:`~htc_vlm.answerer.Answerer` interface: every image
is compressed once and all its questions are answered from its visual cache (the same path at every
compression, ``none`` keeping the full cache); question-aware methods run each question with its image.

Shape notation: I images in a chunk, Q questions in a batch, L question length.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch

from ..answerer import Answerer
from ..data.llava import PromptBuilder, get_template
from ..inference import ImageEncoder


@torch.no_grad()
def answer_questions(model: Answerer, tokenizer, questions: list[dict], source: ImageEncoder,
                     prompt: Callable[[dict], str], template: str = "plain", batch_size: int = 32,
                     max_new_tokens: int = 8, progress: Callable[[int], None] | None = None) -> Iterable[dict]:
    """Yield ``{question_id, prediction}`` per question. A model that reuses image caches gets its
    questions grouped by image (each image compressed once per chunk of images); one that does not
    (the training-free methods) gets them in file order, each with its image."""
    builder = PromptBuilder(tokenizer, get_template(template), model.config)
    prefix = builder.prefix_ids()
    for chunk, images, image_index in _chunks(model, questions, batch_size):
        pix, latents = source.batch(images)
        rows = [builder.question_ids(prompt(q)) for q in chunk]
        outs = model.generate_answers(pix, prefix, rows, max_new_tokens, tokenizer.eos_token_id, latents=latents,
                                      image_index=image_index, pad_token_id=tokenizer.pad_token_id,
                                      batch_size=batch_size)
        for q, ids in zip(chunk, outs):
            yield {"question_id": q["question_id"], "prediction": tokenizer.decode(ids, skip_special_tokens=True).strip()}
        if progress:
            progress(len(chunk))


def _chunks(model: Answerer, questions: list[dict], batch_size: int):
    """(questions, their images, the image of each question) per model call."""
    if not model.reuses_image_cache:
        for b in range(0, len(questions), batch_size):
            chunk = questions[b:b + batch_size]
            yield chunk, [q["image"] for q in chunk], None  # one image row per question
        return
    by_image: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        by_image[q["image"]].append(q)
    images = list(by_image)
    per_chunk = max(1, batch_size // 2)
    for start in range(0, len(images), per_chunk):
        ids = images[start:start + per_chunk]
        chunk = [(i, q) for i, img in enumerate(ids) for q in by_image[img]]
        yield [q for _, q in chunk], ids, [i for i, _ in chunk]
