"""SparseVLM (Zhang et al. 2024, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference"): text-guided and training-free. At a few layers (2, 6, 15 of 32
in the paper's LLaVA setting) the question's text tokens most relevant to the image are chosen as
*raters* (those whose attention to the visual tokens is above the mean), the visual tokens are
scored by the raters' mean attention, and the lowest are dropped; here the counts fall
geometrically to ``budget`` at the last pruning layer.

Left out: SparseVLM's rank-based adaptive count per layer and its token *recycling* (merging the
dropped tokens into a few extra ones); our budget is the exact count of kept tokens instead.
Options: ``layers`` (for 32 layers, scaled) as ``--option layers=2,6,15``."""

import torch

from .layerwise import QuestionAwareVLM, attention_to_visual, keep_top, scaled_layers
from .registry import Method, register, upper_bound


class SparseVLM(QuestionAwareVLM):
    def __init__(self, model, budget, layers: tuple[int, ...] = (2, 6, 15)):
        super().__init__(model, budget)
        n = model.config.text_config.num_hidden_layers
        self.prune_at(scaled_layers(layers, n))

    def select(self, layer, attn, kept, visual, text, query):
        a = attn.float().mean(1)  # (B, T, T) mean over heads
        # the question: text after the image block, up to the prompt's end (answer tokens never rate)
        upto = torch.arange(visual.shape[1], device=visual.device)[None] <= query
        after = visual.long().cumsum(1).clamp(max=1).bool() & ~visual & text & upto  # (B, T)
        relevance = (a * kept[:, None, :]).sum(-1)  # (B, T): each query's attention to kept visual tokens
        rel = relevance.masked_fill(~after, float("nan"))
        raters = after & (relevance >= torch.nanmean(rel, dim=1, keepdim=True))
        raters = torch.where(raters.any(1, keepdim=True), raters, after)
        return keep_top(attention_to_visual(attn, raters, visual), kept, self.counts[layer])


METHOD = register(Method(
    name="sparsevlm", kind="training-free", tables=("2",),
    paper="Zhang et al. 2024, SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
    summary="text raters score the visual tokens; progressive pruning (no recycling)",
    options={"layers": (2, 6, 15)},
    load=lambda path, budget, options: SparseVLM(upper_bound(path), budget, **options),
))
