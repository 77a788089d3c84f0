"""Answering question files: every image is compressed once and all its questions are answered
from its visual cache (the same path at every compression, ``none`` keeping the full cache).

Shape notation: I images in a chunk, Q questions in a batch, L question length.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch

from ..data.llava import PromptBuilder, get_template
from ..inference import ImageEncoder
from ..layout import left_pad
from ..modeling import HTCForConditionalGeneration


@torch.no_grad()
def answer_questions(model: HTCForConditionalGeneration, tokenizer, questions: list[dict], source: ImageEncoder,
                     prompt: Callable[[dict], str], template: str = "plain", batch_size: int = 32,
                     max_new_tokens: int = 8, progress: Callable[[int], None] | None = None) -> Iterable[dict]:
    """Yield ``{question_id, prediction}`` per question, grouped by image (one compress each;
    question-aware methods, the training-free ones, run each image with each of its questions)."""
    builder = PromptBuilder(tokenizer, get_template(template), model.config)
    prefix = builder.prefix_ids()
    if getattr(model, "question_aware", False):
        yield from _answer_question_aware(model, tokenizer, questions, source, prompt, builder, batch_size,
                                          max_new_tokens, progress)
        return
    by_image: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        by_image[q["image"]].append(q)
    images = list(by_image)
    per_chunk = max(1, batch_size // 2)
    for start in range(0, len(images), per_chunk):
        ids = images[start:start + per_chunk]
        pix, q_lat = source.batch(ids)
        cache = model.compress(pix, q_lat, prefix_ids=prefix)  # I images, once
        todo = [(i, q) for i, img in enumerate(ids) for q in by_image[img]]
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            rows = [builder.question_ids(prompt(q)) for _, q in chunk]
            qids, qmask = left_pad(rows, tokenizer.pad_token_id)
            out = model.generate(qids, visual_cache=cache.select([i for i, _ in chunk]), attention_mask=qmask,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, qids.shape[1]:], skip_special_tokens=True)
            for (_, q), text in zip(chunk, texts):
                yield {"question_id": q["question_id"], "prediction": text.strip()}
            if progress:
                progress(len(chunk))


def _answer_question_aware(model, tokenizer, questions, source, prompt, builder, batch_size, max_new_tokens,
                           progress) -> Iterable[dict]:
    for b in range(0, len(questions), batch_size):
        chunk = questions[b:b + batch_size]
        pix, _ = source.batch([q["image"] for q in chunk])
        outs = model.generate_answers(pix, builder.prefix_ids(), [builder.question_ids(prompt(q)) for q in chunk],
                                      max_new_tokens, tokenizer.eos_token_id)
        for q, ids in zip(chunk, outs):
            yield {"question_id": q["question_id"], "prediction": tokenizer.decode(ids, skip_special_tokens=True).strip()}
        if progress:
            progress(len(chunk))
