"""Compress once, ask many: image files to visual caches on disk, and questions answered from them.

An image reaches a model as pixels and, for ``htc`` / ``discrete`` models, its discrete latent q:
from a feature store (keyed by file name) or computed on the fly by a VQ tokenizer folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import VisualCache
from .data.images import CLIP_MEAN, CLIP_STD, load_rgb, to_tensor
from .data.llava import PromptBuilder, get_template
from .errors import HTCError
from .layout import left_pad
from .modeling import HTCForConditionalGeneration


@dataclass
class ImageEncoder:
    """Turns image files into ``(pixel_values, q)`` for one model: the one place that does, for
    ``compress`` / ``ask``, ``htc-vlm eval`` and the lmms-eval plugin."""

    model: HTCForConditionalGeneration
    features: object | None = None  # a FeatureStore
    tokenizer_vq: object | None = None  # a MultiGroupVQ
    image_norm: str = "half"
    resize: bool = False
    root: Path | None = None  # the folder image ids are relative to (question files, LLaVA data)

    def __post_init__(self):
        if self.model.config.compression in ("htc", "discrete") and self.features is None and self.tokenizer_vq is None:
            raise HTCError(f"compression={self.model.config.compression!r} needs q: pass --features (a feature "
                           f"store) or --vq (a tokenizer folder)")

    def load(self, path: Path):
        """The image as the model's tower expects it (an HTCError names a bad file)."""
        return load_rgb(path, self.model.config.vision_config.image_size, self.resize)

    def batch(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixel_values, q) of images named by their ids below ``root`` (the store's keys too)."""
        return self.encode([Path(self.root) / i for i in ids], keys=ids)

    def encode(self, paths: list[Path], imgs: list | None = None,
               keys: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixel_values, q) of ``paths``; pass ``imgs`` when they are already loaded and ``keys``
        to look q up under other names than the file names."""
        mean, std = (CLIP_MEAN, CLIP_STD) if self.image_norm == "clip" else ((0.5,) * 3, (0.5,) * 3)
        imgs = imgs if imgs is not None else [self.load(p) for p in paths]
        pix = torch.stack([to_tensor(i, mean, std) for i in imgs])
        q = None
        if self.model.config.compression in ("htc", "discrete"):
            if self.features is not None:
                q = self.features.batch(keys if keys is not None else [Path(p).name for p in paths])
            else:
                s = self.tokenizer_vq.config.image_size
                q = self.tokenizer_vq.q(torch.stack([to_tensor(i.resize((s, s))) for i in imgs]))
        return pix, q


def cache_path(out: Path, image: Path) -> Path:
    return out / f"{image.stem}.safetensors"


def compress_images(model, encoder: ImageEncoder, images: list[Path], out: Path, template: str = "plain",
                    tokenizer=None, batch_size: int = 16, progress=None) -> tuple[list[Path], list[str]]:
    """One cache file per image in ``out`` (skipping those already there for this model).

    Returns the written files and one message per image that failed; a bad image does not stop
    the others."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = PromptBuilder(tokenizer, get_template(template), model.config).prefix_ids() if tokenizer else None
    fingerprint = model.fingerprint()
    todo, written, failed = [], [], []
    for img in images:
        target = cache_path(out, img)
        if target.exists():
            try:
                VisualCache.load(target, expected_fingerprint=fingerprint)
                if progress:
                    progress(1)
                continue
            except HTCError:
                pass  # another model's or a broken cache: made again
        todo.append(img)
    for start in range(0, len(todo), batch_size):
        chunk, ok, loaded = todo[start:start + batch_size], [], []
        for img in chunk:
            try:
                loaded.append(encoder.load(img))
                ok.append(img)
            except HTCError as e:
                failed.append(str(e))
        if ok:
            pix, q = encoder.encode(ok, loaded)
            cache = model.compress(pix, q, prefix_ids=prefix)
            for i, img in enumerate(ok):
                one = cache.select(i)
                one.meta["image"] = img.name
                one.save(cache_path(out, img))
                written.append(cache_path(out, img))
        if progress:
            progress(len(chunk))
    return written, failed


@torch.no_grad()
def ask(model, tokenizer, cache: VisualCache, questions: list[str], template: str = "plain",
        max_new_tokens: int = 32) -> list[str]:
    """Answer every question from one image's cache, as one batch."""
    if cache.batch_size != 1:
        raise HTCError(f"ask takes the cache of one image, got {cache.batch_size}")
    builder = PromptBuilder(tokenizer, get_template(template), model.config)
    ids, mask = left_pad([builder.question_ids(q) for q in questions], tokenizer.pad_token_id)
    out = model.generate(ids, visual_cache=cache.select([0] * len(questions)), attention_mask=mask,
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
