"""ToMe (Bolya et al. 2022, "Token Merging: Your ViT But Faster"): bipartite soft matching merges
the most similar patch tokens inside the vision tower, ``r`` per layer, until ``budget`` remain.

Per layer: tokens alternate into sets A and B; each A token's most similar B token (cosine of the
layer's attention keys, averaged over heads) is found; the ``r`` most similar pairs are merged by a
size-weighted mean; later layers use proportional attention (log of each token's size added to
its attention scores). As in ToMe, the CLS token is never merged. Differences: we merge after each
whole block (ToMe merges between its attention and MLP) and keep the merged tokens in the order of
their first patch, so the language model receives them in raster order with consecutive positions.
``r`` is spread over the layers up to the feature layer, at most half the tokens per layer; what a
shallow tower cannot remove is merged in extra matching rounds after it.

Needs a CLIP-style tower (``embeddings``, ``pre_layrnorm``, ``encoder.layers`` with
``layer_norm1`` and ``self_attn.k_proj``), as LLaVA uses.

Shape notation: B images, n tokens (CLS first), Dv tower width, r merged per layer.
"""

from __future__ import annotations

import math

import torch

from ..errors import HTCError
from .layerwise import QuestionAwareVLM
from .registry import Method, register, upper_bound


def merge_plan(n: int, budget: int, layers: int) -> list[int]:
    """Tokens merged after each layer (then extra rounds) to go from ``n`` patches to ``budget``."""
    plan, left = [], n - budget
    for i in range(layers):
        r = min(n // 2, math.ceil(left / (layers - i)))
        plan.append(r)
        n, left = n - r, left - r
    while left > 0:
        r = min(n // 2, left)
        plan.append(r)
        n, left = n - r, left - r
    return plan


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, first: torch.Tensor, r: int):
    """Merge ``r`` tokens of x (B, n, Dv), CLS (index 0) excluded; returns x, size, first patch index."""
    if r == 0:
        return x, size, first
    cls, x, metric, size, first = x[:, :1], x[:, 1:], metric[:, 1:], size[:, 1:], first[:, 1:]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    best, dst = (a @ b.transpose(1, 2)).max(-1)  # (B, nA): most similar B token of each A token
    order = best.argsort(dim=-1, descending=True)
    src, keep_a = order[:, :r], order[:, r:]  # A tokens merged away / kept
    xa, xb = x[:, ::2] * size[:, ::2], x[:, 1::2] * size[:, 1::2]  # size-weighted sums
    sa, sb = size[:, ::2].clone(), size[:, 1::2].clone()
    fa, fb = first[:, ::2], first[:, 1::2].clone()
    d = dst.gather(1, src)  # (B, r)
    dv = xa.shape[-1]
    xb = xb.scatter_add(1, d[..., None].expand(-1, -1, dv), xa.gather(1, src[..., None].expand(-1, -1, dv)))
    sb = sb.scatter_add(1, d[..., None], sa.gather(1, src[..., None]))
    fb = fb.scatter_reduce(1, d[..., None], fa.gather(1, src[..., None]), reduce="amin")
    xk, sk, fk = (t.gather(1, keep_a[..., None].expand(-1, -1, t.shape[-1])) for t in (xa, sa, fa))
    x, size, first = torch.cat([xk, xb], 1), torch.cat([sk, sb], 1), torch.cat([fk, fb], 1)
    idx = first[..., 0].argsort(dim=1)  # raster order of each token's first patch
    x, size, first = (t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1])) for t in (x, size, first))
    x = x / size
    one = torch.ones_like(size[:, :1])
    return torch.cat([cls, x], 1), torch.cat([one, size], 1), torch.cat([first[:, :1] * 0 - 1, first], 1)


class ToMe(QuestionAwareVLM):
    def __init__(self, model, budget):
        super().__init__(model, budget)
        c = model.config
        tower = model.model.vision_tower
        if not (hasattr(tower, "embeddings") and hasattr(tower, "encoder") and c.vision_has_cls
                and c.vision_feature_select_strategy == "default"):
            raise HTCError("ToMe here needs a CLIP-style tower with a CLS token (vision_feature_select_strategy='default')")
        n_layers = len(tower.encoder.layers)
        f = c.vision_feature_layer
        self.depth = f if f >= 0 else n_layers + 1 + f  # encoder layers before the feature layer
        self.plan = merge_plan(c.num_patches, self.budget, self.depth)

    def visual_tokens(self, pixel_values):
        tower = self.model.model.vision_tower
        x = tower.embeddings(pixel_values)  # (B, n, Dv)
        if hasattr(tower, "pre_layrnorm"):
            x = tower.pre_layrnorm(x)
        b, n, _ = x.shape
        size = x.new_ones(b, n, 1)
        first = torch.arange(-1, n - 1, device=x.device).expand(b, -1)[..., None]  # CLS = -1
        for i, r in enumerate(self.plan):  # one entry per layer up to the feature layer, then extra rounds
            if i < self.depth:
                layer = tower.encoder.layers[i]
                bias = size.log()[..., 0][:, None, None, :].expand(-1, 1, x.shape[1], -1).to(x.dtype)  # proportional attention
                metric = layer.self_attn.k_proj(layer.layer_norm1(x))  # the keys this layer attends with
                x = layer(x, attention_mask=bias)
            else:
                metric = x
            x, size, first = bipartite_merge(x, metric, size, first, r)
        return self.model.model.multi_modal_projector(x[:, 1:])  # (B, budget, D)


METHOD = register(Method(
    name="tome", kind="training-free", tables=("2",),
    paper="Bolya et al. 2023, Token Merging: Your ViT But Faster (ToMe)",
    summary="bipartite soft matching merges patch tokens in the vision tower",
    load=lambda path, budget, options: ToMe(upper_bound(path), budget),
))
