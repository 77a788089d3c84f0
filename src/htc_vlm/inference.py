"""Compress once, ask many: image files to visual caches on disk, and questions answered from them.

An image reaches a model as pixels and, for ``htc`` / ``discrete`` models, its discrete latent q:
from a feature store (keyed by file name) or computed on the fly by a VQ tokenizer folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import VisualCache
from .data.images import image_under, load_rgb, norm_stats
from .data.processor import PROCESSOR_FILE
from .data.llava import PromptBuilder, get_template
from .errors import HTCError
from .layout import left_pad
from .modeling import HTCForConditionalGeneration


@dataclass
class ImageEncoder:
    """Turns image files into ``(pixel_values, q)`` for one model, with the model's own image
    processing (its ``preprocessor_config.json``): the one place that does, for ``compress`` /
    ``ask`` / ``serve``, ``htc-vlm eval`` and the lmms-eval plugin."""

    model: HTCForConditionalGeneration
    features: object | None = None  # a FeatureStore
    tokenizer_vq: object | None = None  # a MultiGroupVQ
    image_norm: str | None = None  # None: the model's; another name is refused
    resize: bool = False  # a model that takes images of one size only: resize others instead of refusing
    root: Path | None = None  # the folder image ids are relative to (question files, LLaVA data)

    def __post_init__(self):
        own = self.model.image_processing
        if self.image_norm is not None:
            norm_stats(self.image_norm)  # an unknown name fails here, before any image
            if self.image_norm != own.norm:
                raise HTCError(f"image normalisation {self.image_norm!r} given, but the model was trained with "
                               f"{own.norm or own.mean!r} (its {PROCESSOR_FILE}): leave the option out")
        self.image_norm = own.norm
        self.processing = own.squashing() if self.resize else own
        if self.model.config.needs_latents and self.features is None and self.tokenizer_vq is None:
            raise HTCError(f"compression={self.model.config.compression!r} needs q: pass --features (a feature "
                           f"store) or --vq (a tokenizer folder)")

    def load(self, path: Path):
        """The image, checked against the model's processing (an HTCError names a bad file)."""
        return self.processing.check(load_rgb(path), str(path))

    def batch(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixel_values, q) of images named by their ids below ``root`` (the store's keys too)."""
        return self.encode([image_under(self.root, i) for i in ids], keys=ids)

    def encode(self, paths: list[Path], imgs: list | None = None,
               keys: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixel_values, q) of ``paths``; pass ``imgs`` (RGB images) when they are already loaded and
        ``keys`` to look q up under other names than the file names. On the fly, the VQ tokenizer
        sees the same geometry as the tower (padded / cropped as the processing says)."""
        imgs = imgs if imgs is not None else [self.load(p) for p in paths]
        pix = self.processing.pixels(imgs)
        q = None
        if self.model.config.needs_latents:
            if self.features is not None:
                q = self.features.batch(keys if keys is not None else [Path(p).name for p in paths])
            else:
                s = self.tokenizer_vq.config.image_size
                unit = self.processing.to_unit(pix)
                if unit.shape[-1] != s:
                    unit = torch.nn.functional.interpolate(unit, size=(s, s), mode="bicubic", antialias=True)
                q = self.tokenizer_vq.q(unit)
        return pix, q


def cache_maker(fingerprint: str, prefix: list[int] | None, layout: str = "") -> str:
    """12 hex digits naming what made a cache: the model's fingerprint, the template prefix and, for
    a cache stored in another layout (the server's image part alone), that layout."""
    return hashlib.sha256(f"{fingerprint}:{prefix}{':' + layout if layout else ''}".encode()).hexdigest()[:12]


def cache_path(out: Path, image_bytes: bytes, stem: str, fingerprint: str, prefix: list[int] | None = None) -> Path:
    """``OUT/<stem>-<image hash>-<maker>.safetensors``: keyed by the image's content (16 hex digits of
    its SHA-256) and by what made the cache (:func:`cache_maker`), so two images with one name, a
    changed image, or two models or templates sharing a folder never meet one another's cache; the
    stem is only there for people."""
    return out / f"{stem}-{hashlib.sha256(image_bytes).hexdigest()[:16]}-{cache_maker(fingerprint, prefix)}.safetensors"


def compress_images(model, encoder: ImageEncoder, images: list[Path], out: Path, template: str = "plain",
                    tokenizer=None, batch_size: int = 16, progress=None) -> tuple[dict[Path, Path], list[str]]:
    """One cache file per image in ``out`` (see :func:`cache_path`), skipping those already there.

    Returns ``{image: cache file}`` of every image compressed now, and one message per image that
    failed; a bad image does not stop the others. A cache already there that does not load (a
    broken or edited file) is made again."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = PromptBuilder(tokenizer, get_template(template), model.config).prefix_ids() if tokenizer else None
    fingerprint = model.fingerprint()
    todo, written, failed = [], {}, []
    for img in images:
        try:
            target = cache_path(out, Path(img).read_bytes(), Path(img).stem, fingerprint, prefix)
        except OSError as e:
            failed.append(f"cannot read image {img}: {e.strerror or e}")
            if progress:
                progress(1)
            continue
        if target.exists():
            try:
                VisualCache.load(target, expected_fingerprint=fingerprint)
                if progress:
                    progress(1)
                continue
            except HTCError:
                pass  # a broken or edited cache: made again
        todo.append((img, target))
    for start in range(0, len(todo), batch_size):
        chunk, ok, loaded = todo[start:start + batch_size], [], []
        for img, target in chunk:
            try:
                loaded.append(encoder.load(img))
                ok.append((img, target))
            except HTCError as e:
                failed.append(str(e))
        if ok:
            pix, q = encoder.encode([img for img, _ in ok], loaded)
            cache = model.compress(pix, q, prefix_ids=prefix)
            for i, (img, target) in enumerate(ok):
                one = cache.select(i)
                one.meta["image"] = Path(img).name
                one.save(target)
                written[img] = target
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
    if "prefix_ids" in cache.meta and cache.meta["prefix_ids"] != builder.prefix_ids():
        raise HTCError(f"this visual cache was made with another template's prefix than {template!r}: "
                       f"ask with the template it was compressed with")
    ids, mask = left_pad([builder.question_ids(q) for q in questions], tokenizer.pad_token_id)
    out = model.generate(ids, visual_cache=cache.select([0] * len(questions)), attention_mask=mask,
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
