"""Running the upper-bound model with visual tokens dropped inside the language model: the engine
behind the training-free methods of Table 2 (FastV, PDrop, SparseVLM) and the answering path they
share with ToMe.

These methods choose visual tokens with the question in view, so the image cannot be compressed
once and reused: each question runs ``[prefix] [visual tokens] [question]`` through the model.
Dropping a visual token after layer ``i`` is done by masking it as a key in every later layer,
with the original RoPE positions kept (as FastV's code does); for the tokens that remain this is
exactly what removing the token from the sequence computes. The selection is made once from the
prompt (its last token's attention), as with a KV cache, and answer tokens see only what is kept.

The language model is run layer by layer, each decoder layer called whole with its own mask;
the attention weights a selection reads come from a forward hook on the layer's ``self_attn``
(eager attention returns them). It answers through the same :class:`~htc_vlm.answerer.Answerer`
interface as the compressing models, with a greedy loop of its own that a test compares with
transformers' ``generate`` on the upper bound at the full budget.

Shape notation: B rows (one question each), T sequence, K visual tokens, H heads, V vocabulary.
"""

from __future__ import annotations

import hashlib

import torch

from ..answerer import rows_images
from ..errors import HTCError
from ..layout import check_context, positions
from ..modeling import HTCForConditionalGeneration


class QuestionAwareVLM:
    """An uncompressed model answering through its own visual tokens and selection. Subclasses
    override :meth:`visual_tokens` (ToMe) and/or :meth:`select` with ``score_layers`` (FastV...)."""

    reuses_image_cache = False  # Answerer: the visual tokens depend on the question, so nothing is reused
    score_layers: tuple[int, ...] = ()  # layers whose attention weights select() reads

    def __init__(self, model: HTCForConditionalGeneration, budget: int | None):
        if not model.config.compression_spec.uncompressed:
            raise HTCError("training-free methods apply to the uncompressed upper-bound model")
        model.set_attn_implementation("eager")  # eager attention returns the weights select() reads
        self.model, self.config = model.eval(), model.config
        self.budget = model.config.num_patches if budget is None else budget
        if not 1 <= self.budget <= model.config.num_patches:
            raise HTCError(f"budget must be between 1 and the {model.config.num_patches} patch tokens, got {self.budget}")
        layer = model.model.language_model.layers[0]
        if not hasattr(layer, "self_attn"):
            raise HTCError(f"{type(layer).__name__} has no self_attn: layer-wise pruning reads its attention weights")
        self.kept_counts: list[int] = []  # visual tokens each layer's queries saw, last call, row 0

    def eval(self):
        return self

    @property
    def image_processing(self):
        return self.model.image_processing

    def fingerprint(self) -> str:
        """The weights' fingerprint and this method's settings (what makes its answers)."""
        settings = (type(self).__name__, self.budget, self.score_layers, sorted(getattr(self, "counts", {}).items()))
        return hashlib.sha256(f"{self.model.fingerprint()}:{settings!r}".encode()).hexdigest()

    def prune_at(self, layers: tuple[int, ...]) -> None:
        """Read attention at ``layers`` and fall geometrically to ``budget`` kept tokens over them."""
        self.score_layers = layers
        self.counts = dict(zip(layers, schedule(self.config.num_patches, self.budget, len(layers))))

    # ------------------------------------------------------------------ overridable parts

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, D): the projected patch tokens."""
        return self.model.model.patch_embeddings(pixel_values)

    def select(self, layer: int, attn: torch.Tensor, kept: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
               query: int) -> torch.Tensor:
        """After ``layer`` (whose attention probabilities are ``attn``, (B, H, T, T)): the visual
        tokens kept for the layers after it, a (B, T) bool subset of ``kept``."""
        return kept

    # ------------------------------------------------------------------ the engine

    def _run(self, embeds: torch.Tensor, pad_mask: torch.Tensor, visual: torch.Tensor, query: int) -> torch.Tensor:
        """Logits (B, T, V) with visual tokens dropped per :meth:`select`."""
        lm = self.model.model.language_model
        b, t, _ = embeds.shape
        text = pad_mask.bool() & ~visual
        pos = positions(pad_mask)
        pe = lm.rotary_emb(embeds, pos)
        idx = torch.arange(t, device=embeds.device)
        eye = (idx[:, None] == idx[None, :])[None]
        base = (idx[None, :] <= idx[:, None])[None] & pad_mask.bool()[:, None, :]  # (B, T, T) causal, no pad keys
        kept, h, counts, seen = visual.clone(), embeds, [], {}
        hooks = [lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out[1]))
                 for i in self.score_layers if i < len(lm.layers)]  # out: (attention output, weights)
        try:
            for i, layer in enumerate(lm.layers):
                allowed = (base & ~(visual & ~kept)[:, None, :]) | eye
                mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
                mask = mask.masked_fill_(~allowed, torch.finfo(h.dtype).min)[:, None]  # additive: eager adds it
                counts.append(int(kept[0].sum()))
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                if i in self.score_layers:
                    weights = seen.pop(i, None)
                    if weights is None:
                        raise HTCError("layer-wise pruning needs eager attention weights")
                    kept = self.select(i, weights, kept, visual, text, query)
        finally:
            for hook in hooks:
                hook.remove()
        self.kept_counts = counts
        return self.model.lm_head(lm.norm(h))

    def _layout(self, pixel_values, prefix_ids: list[int], rows: list[list[int]], new_tokens: int = 0):
        """Left-padded ``[prefix][visual][question]`` rows: embeds, pad mask, visual mask."""
        vis = self.visual_tokens(pixel_values)  # (B, K, D)
        emb = self.model.get_input_embeddings()
        k, p = vis.shape[1], len(prefix_ids)
        t = p + k + max(map(len, rows))
        check_context(self.config, t + new_tokens, "a question")
        embeds = vis.new_zeros(len(rows), t, vis.shape[-1])
        pad_mask = torch.zeros(len(rows), t, dtype=torch.long, device=vis.device)
        visual = torch.zeros(len(rows), t, dtype=torch.bool, device=vis.device)
        for r, q in enumerate(rows):
            s = t - (p + k + len(q))
            ids = torch.tensor(list(prefix_ids) + list(q), device=vis.device)
            text_emb = emb(ids)
            embeds[r, s:s + p] = text_emb[:p]
            embeds[r, s + p:s + p + k] = vis[r]
            embeds[r, s + p + k:] = text_emb[p:]
            pad_mask[r, s:] = 1
            visual[r, s + p:s + p + k] = True
        return embeds, pad_mask, visual

    @torch.no_grad()
    def next_token_logits(self, pixel_values: torch.Tensor, prefix_ids: list[int], rows: list[list[int]], *,
                          latents: torch.Tensor | None = None, image_index: list[int] | None = None,
                          pad_token_id: int = 0) -> torch.Tensor:
        """(R, V): the logits after each question (multiple-choice scoring); ``latents`` are not read."""
        pixel_values = _per_row(pixel_values, image_index, len(rows))
        embeds, pad_mask, visual = self._layout(pixel_values, prefix_ids, rows)
        return self._run(embeds, pad_mask, visual, embeds.shape[1] - 1)[:, -1]

    @torch.no_grad()
    def generate_answers(self, pixel_values: torch.Tensor, prefix_ids: list[int], rows: list[list[int]],
                         max_new_tokens: int, eos_token_id: int, *, latents: torch.Tensor | None = None,
                         image_index: list[int] | None = None, pad_token_id: int = 0,
                         batch_size: int | None = None) -> list[list[int]]:
        """Greedy answers, one per row, without the prompt (see :class:`~htc_vlm.answerer.Answerer`)."""
        pixel_values = _per_row(pixel_values, image_index, len(rows))
        if batch_size and len(rows) > batch_size:  # one image row per question from here on
            return [a for b in range(0, len(rows), batch_size)
                    for a in self.generate_answers(pixel_values[b:b + batch_size], prefix_ids, rows[b:b + batch_size],
                                                   max_new_tokens, eos_token_id)]
        embeds, pad_mask, visual = self._layout(pixel_values, prefix_ids, rows, max_new_tokens)
        query = embeds.shape[1] - 1  # the selection reads the prompt's last token, fixed while decoding
        emb = self.model.get_input_embeddings()
        out = [[] for _ in rows]
        done = torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = self._run(embeds, pad_mask, visual, query)[:, -1].argmax(-1)  # (B,)
            for r, tok in enumerate(nxt.tolist()):
                if not done[r]:
                    out[r].append(tok)
            done |= nxt.cpu() == eos_token_id
            if bool(done.all()):
                break
            embeds = torch.cat([embeds, emb(nxt)[:, None]], dim=1)
            pad_mask = torch.cat([pad_mask, pad_mask.new_ones(len(rows), 1)], dim=1)
            visual = torch.cat([visual, visual.new_zeros(len(rows), 1)], dim=1)
        return [[x for x in o if x != eos_token_id] for o in out]


def _per_row(pixel_values: torch.Tensor, image_index: list[int] | None, n_rows: int) -> torch.Tensor:
    """(R, 3, H, W): each row's image (the images as given when they are one per row already)."""
    return pixel_values if image_index is None else pixel_values[rows_images(image_index, n_rows)]


def attention_to_visual(attn: torch.Tensor, queries: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Mean attention (over heads and the given query rows) each token receives: (B, T), -inf off-visual.

    attn (B, H, T, T) probabilities; queries (B, T) bool, the rows to average."""
    a = attn.float().mean(1)  # (B, T, T)
    w = queries.float()
    score = (a * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)  # (B, T)
    return score.masked_fill(~visual, float("-inf"))


def last_token_scores(attn: torch.Tensor, query: int, visual: torch.Tensor) -> torch.Tensor:
    """:func:`attention_to_visual` from the prompt's last token alone (FastV, PDrop): (B, T)."""
    last = torch.zeros_like(visual)
    last[:, query] = True
    return attention_to_visual(attn, last, visual)


def keep_top(score: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` highest-scoring tokens among ``kept`` (B, T) bool; ties broken by position."""
    s = score.masked_fill(~kept, float("-inf"))
    top = s.topk(n, dim=1).indices  # (B, n)
    out = torch.zeros_like(kept)
    return out.scatter_(1, top, True) & kept


def schedule(n_tokens: int, budget: int, stages: int) -> list[int]:
    """Token counts after each of ``stages`` pruning steps, falling geometrically to ``budget``."""
    ratio = (budget / n_tokens) ** (1 / stages)
    counts = [max(budget, round(n_tokens * ratio ** (s + 1))) for s in range(stages)]
    counts[-1] = budget
    return counts


def scaled_layers(layers_of_32: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Pruning layers given for a 32-layer LLM (the papers' LLaVA-7B) mapped to ``num_layers``,
    kept inside the model and strictly increasing."""
    out = []
    for layer in layers_of_32:
        if not 1 <= layer <= 31:
            raise HTCError(f"pruning layer {layer} is outside 1-31 (layers are given as in the papers' 32-layer "
                           f"LLaVA-7B and scaled to this model's {num_layers})")
        x = min(num_layers - 1, max(0, round(layer * num_layers / 32)))
        if out and x <= out[-1]:
            x = out[-1] + 1
        if x < num_layers:
            out.append(x)
    return tuple(out)
