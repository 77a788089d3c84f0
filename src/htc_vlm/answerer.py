"""The one interface evaluation asks of a model: answer questions about images.

Two kinds of model implement it:

- :class:`~htc_vlm.modeling.HTCForConditionalGeneration` (every trained method and both bounds)
  compresses each image once and answers all of its questions from that visual cache
  (``reuses_image_cache = True``). Serving and the lmms-eval plugin need this kind, since they
  keep caches between requests.
- :class:`~htc_vlm.methods.layerwise.QuestionAwareVLM` (FastV, PDrop, SparseVLM, ToMe) chooses
  visual tokens with the question in view, so it runs image and question together on every call
  (``reuses_image_cache = False``).

The evaluator batches questions by image for the first kind and in file order for the second,
and otherwise calls the same two methods on both.

Shape notation: I images, R question rows, V vocabulary.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Answerer(Protocol):
    reuses_image_cache: bool  # True: an image's cache, made once, answers every question about it

    def generate_answers(self, pixel_values: torch.Tensor, prefix_ids: list[int], rows: list[list[int]],
                         max_new_tokens: int, eos_token_id: int, *, latents: torch.Tensor | None = None,
                         image_index: list[int] | None = None, pad_token_id: int = 0,
                         batch_size: int | None = None) -> list[list[int]]:
        """Greedy answer ids (prompt and end-of-answer token left out), one list per row. Row r asks
        about image ``image_index[r]`` of ``pixel_values`` (I, 3, H, W) (default: image r);
        ``latents`` (I, ...) are the images' discrete latents, for methods that read them. At most
        ``batch_size`` rows go through the model at once (default: all)."""
        ...

    def next_token_logits(self, pixel_values: torch.Tensor, prefix_ids: list[int], rows: list[list[int]], *,
                          latents: torch.Tensor | None = None, image_index: list[int] | None = None,
                          pad_token_id: int = 0) -> torch.Tensor:
        """(R, V): the logits right after each row's prompt (multiple-choice scoring by likelihood)."""
        ...


def rows_images(image_index: list[int] | None, n_rows: int) -> list[int]:
    """Which image each row asks about: ``image_index``, or row r about image r."""
    return list(range(n_rows)) if image_index is None else list(image_index)
