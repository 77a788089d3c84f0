"""HTC-VLM on transformers: the hybrid sequence, the disentanglement mask and a real voco KV cache.

The forward pass is the paper's Algorithm 1 in stages, each callable alone::

    patch_embeddings(pixel_values)      V   = P_v(E_v(I))             Eq. 3   (B, N, D)
    discrete_anchors(q)                 v_d = P_d(q)                  Eq. 4   (B, N_d, D)
    image_block(pixel_values, q)        V_hy = [v_d; V]               Eq. 5   (B, N_d + N, D)
    forward(input_ids, ...)             logits under M_hy             Eq. 6, 9
    compress(pixel_values, q)           the voco positions' keys and values (a VisualCache)
    generate(..., visual_cache=...)     answers from the cache, no image token in the KV cache

Weights are laid out as transformers' ``LlavaForConditionalGeneration`` (``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model``, ``lm_head``), so a LLaVA checkpoint loads
unchanged (:meth:`HTCForConditionalGeneration.from_llava`) and only P_d and voco are new.

Shape notation: B batch, T sequence, N patches, N_d anchors, D language-model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .anchors import AnchorProjector
from .answerer import rows_images
from .cache import VisualCache
from .configuration import HTCConfig
from .data.processor import ImageProcessing
from .errors import HTCError
from .layout import IMAGE, PAD, VOCO, check_context, image_prompt_ids, left_pad, positions, token_kinds
from .masking import attention_mask_4d, block_mask
from .pooling import QFormerPooler
from .vision import Projector, patch_features

AutoConfig.register(HTCConfig.model_type, HTCConfig, exist_ok=True)


def check_model_folder(path: Path) -> None:
    """``path`` holds an htc-vlm model: a folder with a ``config.json`` of ``model_type: htc_vlm``."""
    import json

    config = path / "config.json"
    if not config.is_file():
        raise HTCError(f"{path} is not a model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise HTCError(f"{config} is not a model config (not a JSON object)") from e
    if model_type != HTCConfig.model_type:
        hint = (" (a LLaVA checkpoint: load it with HTCForConditionalGeneration.from_llava)"
                if model_type == "llava" else "")
        raise HTCError(f"{path} holds a {model_type or 'untyped'} model, not an htc-vlm one "
                       f"(config.json model_type {model_type!r}, expected {HTCConfig.model_type!r}){hint}")


@functools.cache
def _cache_argument_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_argument(lm: nn.Module) -> str:
    """The name under which ``lm``'s forward takes its KV cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before."""
    return _cache_argument_of(type(lm).forward)


# ... and the output field that holds it (reading the old name warns from 5.24 on)
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class HTCPreTrainedModel(PreTrainedModel):
    config: HTCConfig
    config_class = HTCConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True  # the mask then goes in as a BlockMask (masking.block_mask)
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def _init_weights(self, module):
        """transformers' defaults, plus our one bare parameter: parameters a checkpoint lacks (a new
        method's modules loaded from the upper bound) are initialised here, not left as raw memory."""
        super()._init_weights(module)
        if isinstance(module, QFormerPooler):
            init.normal_(module.queries, mean=0.0, std=0.02)


class HTCModel(HTCPreTrainedModel):
    """Vision tower, projectors, voco embeddings and the language model (no LM head)."""

    def __init__(self, config: HTCConfig):
        super().__init__(config)
        d = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = Projector(config.vision_config.hidden_size, d, config.projector_type,
                                               config.projector_bias, config.projector_norm)
        # The compression's own modules (anchor projector, pooler, ...), built only where it uses them:
        # an unused parameter would break DDP. Their attribute names are the checkpoint's prefixes.
        own = config.compression_spec.modules(config)
        for name, module in own.items():
            self.add_module(name, module)
        self.compression_modules = tuple(own)  # their names, for what a checkpoint without them lacks
        self.voco_embeddings = nn.Embedding(config.num_voco, d)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ------------------------------------------------------------------ the two channels

    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Eq. 3, the continuous channel: (B, 3, H, W) -> (B, N, D)."""
        feats = patch_features(self.vision_tower, pixel_values, self.config)
        return self.multi_modal_projector(feats)

    def check_latents(self, q: torch.Tensor | None, batch: int) -> torch.Tensor:
        c = self.config
        if q is None:
            raise HTCError(f"compression={c.compression!r} needs discrete_latents (q), one per image")
        q = q.reshape(q.shape[0], -1) if q.ndim > 2 else q
        if q.ndim != 2 or q.shape != (batch, c.discrete_dim):
            raise HTCError(f"discrete_latents must be (B={batch}, {c.discrete_dim}) = {c.discrete_channels} x "
                           f"{c.discrete_grid} x {c.discrete_grid} flattened, got {tuple(q.shape)}")
        return q

    @property
    def has_anchors(self) -> bool:
        return isinstance(getattr(self, "anchor_projector", None), AnchorProjector)

    def discrete_anchors(self, q: torch.Tensor) -> torch.Tensor:
        """Eq. 4, the discrete channel: q (B, Q) -> anchors (B, N_d, D)."""
        if not self.has_anchors:
            raise HTCError(f"this model (compression={self.config.compression!r}) has no anchor projector")
        return self.anchor_projector(self.check_latents(q, q.shape[0]).to(self.anchor_projector.linear_1.weight.dtype))

    def image_block(self, pixel_values: torch.Tensor | None, q: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 5: the tokens that fill the ``<image>`` placeholders, (B, config.num_image_tokens, D),
        as the config's compression makes them (methods/compression.py)."""
        return self.config.compression_spec.image_block(self, pixel_values, q)

    def embed(self, input_ids: torch.Tensor, kinds: torch.Tensor, pixel_values: torch.Tensor | None,
              q: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image block and the voco embeddings scattered in: (B, T, D)."""
        placeholder = (kinds == IMAGE) | (kinds == VOCO) | (kinds == PAD)
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        n_blocks = int((kinds == IMAGE).any(dim=1).sum())
        ref = pixel_values if self.config.compression_spec.reads_pixels else q  # what one image arrives as
        n_images = 0 if ref is None else ref.shape[0]
        if n_blocks != n_images:
            raise HTCError(f"the prompts hold {n_blocks} image blocks but {n_images} images were given")
        if n_blocks:
            block = self.image_block(pixel_values, q)  # (n_blocks, num_image_tokens, D)
            embeds = embeds.masked_scatter((kinds == IMAGE)[..., None], block.to(embeds.dtype))
        n_voco_rows = int((kinds == VOCO).any(dim=1).sum())
        if n_voco_rows:
            voco = self.voco_embeddings.weight.to(embeds.dtype)  # (num_voco, D)
            embeds = embeds.masked_scatter((kinds == VOCO)[..., None], voco.expand(n_voco_rows, -1, -1))
        return embeds


class HTCForConditionalGeneration(HTCPreTrainedModel, GenerationMixin):
    """HTC-VLM: a LLaVA-style model whose image reaches the text through ``num_voco`` tokens."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch

    def __init__(self, config: HTCConfig):
        super().__init__(config)
        self.model = HTCModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def resize_voco(self, num_voco: int) -> None:
        """Keep ``num_voco`` voco tokens: each new embedding starts as the mean of the old ones (RoPE
        positions tell the copies apart), and the config says the new count. A no-op at the same count."""
        if num_voco < 1:
            raise HTCError(f"num_voco must be at least 1, got {num_voco}")
        old = self.model.voco_embeddings.weight.data  # (old num_voco, D)
        if num_voco == old.shape[0]:
            return
        new = nn.Embedding(num_voco, old.shape[1]).to(device=old.device, dtype=old.dtype)
        new.weight.data[:] = old.mean(0)
        self.model.voco_embeddings = new
        self.config.num_voco = num_voco

    # ------------------------------------------------------------------ training forward (Eq. 9)

    def _mask(self, kinds: torch.Tensor, dtype: torch.dtype, segments: torch.Tensor | None = None):
        """M_hy for the language model's attention: a BlockMask under flex_attention, else the
        additive (B, 1, T, T) mask in the model's dtype (masking.py)."""
        c = self.config
        if self.model.language_model.config._attn_implementation == "flex_attention":
            return block_mask(kinds, c.compresses, c.vision_attention, segments)
        return attention_mask_4d(kinds, c.compresses, c.vision_attention, dtype, segments)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        discrete_latents: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        segment_ids: torch.LongTensor | None = None,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the answer loss of Eq. 9 when ``labels`` are given, -100 = ignored).

        With ``<image>`` placeholders in ``input_ids`` the image block is built and the
        disentanglement mask applied (a fresh sequence: the prompt must start here). Without them
        this is the plain language model, e.g. a question continuing a :class:`VisualCache`.
        ``segment_ids`` (with ``position_ids``) mark packed records that must not see each other
        (:class:`~htc_vlm.data.llava.LlavaDataset` with ``pack_by_image``).
        """
        lm = self.model.language_model
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # the Trainer's count, for accumulation
        # transformers 5.24 renamed the KV cache argument `past_key_values` to `cache` (the old name goes in
        # 5.40): take either, and hand it on under the name this language model takes (nothing when None)
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None:
            kwargs[_cache_argument(lm)] = past_key_values
        has_image = input_ids is not None and bool((input_ids == self.config.image_token_id).any())
        if has_image or pixel_values is not None or discrete_latents is not None or segment_ids is not None:
            if input_ids is None:
                raise HTCError("image prompts need input_ids with <image> placeholders")
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise HTCError("an image prompt must start the sequence; to reuse an image use compress() "
                               "and generate(visual_cache=...)")
            am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            kinds = token_kinds(input_ids, am, self.config)
            embeds = self.model.embed(input_ids, kinds, pixel_values, discrete_latents)
            mask = self._mask(kinds, embeds.dtype, segment_ids)
            out = lm(inputs_embeds=embeds, attention_mask=mask,
                     position_ids=position_ids if position_ids is not None else positions(am),
                     use_cache=use_cache, **kwargs)
        else:
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:  # Eq. 9: next-token loss on answer tokens (labels -100 elsewhere)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100, reduction="sum")
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum())
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      attentions=out.attentions, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    # ------------------------------------------------------------------ compress once, ask many

    def image_prefill(self, pixel_values: torch.Tensor | None, discrete_latents: torch.Tensor | None = None,
                      prefix_ids: list[int] | None = None, **lm_kwargs):
        """Run the question-independent head ``[prefix] [image block] [voco]`` through the language
        model under this config's mask: ``(kinds (B, T), language-model output)``. ``lm_kwargs`` go
        to the language model (a cache, ``output_attentions``...). :meth:`compress` and the analyses
        (probing, attention maps) share it."""
        ref = pixel_values if pixel_values is not None else discrete_latents
        if ref is None:
            raise HTCError("compress() needs pixel_values (and discrete_latents for htc / discrete)")
        b, device = ref.shape[0], ref.device
        ids = torch.tensor(image_prompt_ids(self.config, prefix_ids), device=device).expand(b, -1)
        kinds = token_kinds(ids, None, self.config)
        embeds = self.model.embed(ids, kinds, pixel_values, discrete_latents)
        mask = self._mask(kinds, embeds.dtype)
        out = self.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                         position_ids=torch.arange(ids.shape[1], device=device).expand(b, -1),
                                         **lm_kwargs)
        return kinds, out

    @torch.no_grad()
    def compress(self, pixel_values: torch.Tensor | None, discrete_latents: torch.Tensor | None = None,
                 prefix_ids: list[int] | None = None) -> VisualCache:
        """Run ``[prefix] [image block] [voco]`` once; keep only what text may attend to.

        Returns a :class:`VisualCache` with the prefix and voco positions of every layer (every
        position when compression is off), shape (B, kv_heads, len(prefix) + num_voco, head_dim).
        """
        fresh = {_cache_argument(self.model.language_model): DynamicCache(config=self.config.text_config)}
        kinds, out = self.image_prefill(pixel_values, discrete_latents, prefix_ids, use_cache=True, **fresh)
        t = kinds.shape[1]
        keep = (kinds[0] != IMAGE).nonzero().flatten() if self.config.compresses else torch.arange(t, device=kinds.device)
        layers = getattr(out, _CACHE_FIELD).layers
        return VisualCache(
            keys=[layer.keys.index_select(-2, keep) for layer in layers],
            values=[layer.values.index_select(-2, keep) for layer in layers],
            next_position=t, fingerprint=self.fingerprint(),
            meta={"compression": self.config.compression, "num_voco": self.config.num_voco,
                  "kept_positions": keep.tolist(), "full_length": t, "prefix_ids": list(prefix_ids or [])},
        )

    def answer_inputs(self, visual_cache: VisualCache, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> dict:
        """Arguments that make the language model continue a visual cache with ``input_ids``.

        The question is left-padded after the cache; its positions continue at the original
        ``next_position`` (RoPE is baked into the cached keys). One cache per question row.
        """
        visual_cache.check(self.fingerprint())
        if visual_cache.batch_size != input_ids.shape[0]:
            raise HTCError(f"the visual cache holds {visual_cache.batch_size} images but {input_ids.shape[0]} "
                           f"questions were given; use cache.select([...]) to repeat an image per question")
        if bool(((input_ids == self.config.image_token_id) | (input_ids == self.config.voco_token_id)).any()):
            raise HTCError("questions answered from a visual cache must not contain <image> or <voco> tokens")
        am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        ones = am.new_ones(am.shape[0], visual_cache.length)
        return {"input_ids": input_ids, "attention_mask": torch.cat([ones, am], dim=1),
                "position_ids": visual_cache.next_position + positions(am),
                # `cache` from transformers 5.24 on (generate and the models were renamed together)
                _cache_argument(self.model.language_model): visual_cache.to_dynamic_cache()}

    def generate(self, input_ids: torch.Tensor | None = None, *, visual_cache: VisualCache | None = None,
                 pixel_values: torch.Tensor | None = None, discrete_latents: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers' ``generate``, answering from a :class:`VisualCache`.

        ``generate(question_ids, visual_cache=cache)``: the cache holds the image; ``input_ids`` are
        the question only. ``generate(question_ids, pixel_values=..., discrete_latents=...)``:
        compresses first, then the same. Either way the KV cache never holds an image token when
        compression is on. Returns the question ids followed by the generated ids, as transformers.
        """
        if pixel_values is not None or discrete_latents is not None:
            if visual_cache is not None:
                raise HTCError("give either visual_cache or pixel_values, not both")
            visual_cache = self.compress(pixel_values, discrete_latents)
        if visual_cache is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new = kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens or 0
        check_context(self.config, visual_cache.next_position + input_ids.shape[1] + new, "a question")
        return super().generate(**self.answer_inputs(visual_cache, input_ids, attention_mask), **kwargs)

    # ---------------------------------------------------------------- the Answerer interface (answerer.py)

    reuses_image_cache = True  # each image is compressed once; its cache answers all of its questions

    @torch.no_grad()
    def generate_answers(self, pixel_values: torch.Tensor | None, prefix_ids: list[int], rows: list[list[int]],
                         max_new_tokens: int, eos_token_id: int, *, latents: torch.Tensor | None = None,
                         image_index: list[int] | None = None, pad_token_id: int = 0,
                         batch_size: int | None = None) -> list[list[int]]:
        """Greedy answers: the I images compressed once, then ``rows`` answered from their caches in
        batches of ``batch_size`` (default: all at once); see :class:`~htc_vlm.answerer.Answerer`."""
        cache = self.compress(pixel_values, latents, prefix_ids=prefix_ids)  # (I, H, K, Dh)
        which, step, out = rows_images(image_index, len(rows)), batch_size or max(1, len(rows)), []
        for b in range(0, len(rows), step):
            ids, mask = left_pad(rows[b:b + step], pad_token_id)  # (R', L)
            gen = self.generate(ids, visual_cache=cache.select(which[b:b + step]), attention_mask=mask,
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id)
            for row in gen[:, ids.shape[1]:].tolist():
                out.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
        return out

    @torch.no_grad()
    def next_token_logits(self, pixel_values: torch.Tensor | None, prefix_ids: list[int], rows: list[list[int]], *,
                          latents: torch.Tensor | None = None, image_index: list[int] | None = None,
                          pad_token_id: int = 0) -> torch.Tensor:
        """(R, V): the logits after each row's prompt, from the images' caches."""
        cache = self.compress(pixel_values, latents, prefix_ids=prefix_ids)
        ids, mask = left_pad(rows, pad_token_id)
        return self(**self.answer_inputs(cache.select(rows_images(image_index, len(rows))), ids, mask)).logits[:, -1]

    def fingerprint(self) -> str:
        """Identifies the weights and compression layout, stable across save/load (not dtype-blind)."""
        h = hashlib.sha256()
        c = self.config
        h.update(repr((c.compression, c.num_voco, c.num_image_tokens, c.vision_attention, c.fusion)).encode())
        h.update(repr(sorted(self.image_processing.to_dict().items())).encode())  # other pixels, other caches
        for name, p in self.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)  # exact, any size
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
        return h.hexdigest()

    @property
    def image_processing(self) -> ImageProcessing:
        """How this model's images become pixels: its folder's ``preprocessor_config.json`` when it
        was loaded from one, else ``exact`` with ``config.image_norm`` (data/processor.py)."""
        set_ = self.__dict__.get("_image_processing")
        return set_ or ImageProcessing.named(self.config.vision_config.image_size, self.config.image_norm)

    @image_processing.setter
    def image_processing(self, value: ImageProcessing) -> None:
        size = self.config.vision_config.image_size
        if value.size != size:
            raise HTCError(f"an image processing for {value.size} px images does not fit a {size} px vision tower")
        self.__dict__["_image_processing"] = value
        if value.norm is not None:
            self.config.image_norm = value.norm

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' saving, plus the image processor (``preprocessor_config.json``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.image_processing.save(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, after checking that a local folder holds one of our checkpoints: a
        folder without ``config.json``, or whose config is not ``model_type: htc_vlm`` (which would
        otherwise be built from defaults, a 7B-size Llama), is one HTCError, and so are unreadable
        weights. A path that does not exist is not sent to the hub (no network retries)."""
        path = Path(str(pretrained_model_name_or_path))
        if isinstance(pretrained_model_name_or_path, (str, Path)) and path.exists():
            check_model_folder(path)
            if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
                raise HTCError(f"{path} has no safetensors weights (model.safetensors); pickled weights "
                               f"(pytorch_model.bin) are not loaded")
            wants_info = kwargs.pop("output_loading_info", False)
            try:
                model, info = super().from_pretrained(pretrained_model_name_or_path, *args, use_safetensors=True,
                                                      output_loading_info=True, **kwargs)
            except (OSError, ValueError, RuntimeError, SafetensorError) as e:
                raise HTCError(f"cannot load the model in {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
            lost = [k for k in info["missing_keys"] if ".language_model." in f".{k}"]
            if lost:  # new modules of a method (voco, P_d) may start untrained; the language model may not
                raise HTCError(f"the weights in {path} lack {len(lost)} language-model tensors (e.g. {lost[0]}): "
                               f"not a checkpoint of this model")
            saved = ImageProcessing.load(path, model.config.vision_config.image_size)
            if saved is not None:
                model.image_processing = saved
            return (model, info) if wants_info else model
        raw = str(pretrained_model_name_or_path)
        if isinstance(pretrained_model_name_or_path, (str, Path)) and (
                raw.startswith((".", "~", "/", "\\")) or raw.count("/") > 1 or path.is_absolute()):
            raise HTCError(f"model folder not found: {path}")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # ------------------------------------------------------------------ from an existing LLaVA

    @classmethod
    def from_llava(cls, llava, voco_token_id: int | None = None, tokenizer=None,
                   **config_overrides) -> "HTCForConditionalGeneration":
        """An HTC model reusing a transformers ``LlavaForConditionalGeneration`` (instance or local
        folder in the llava-hf layout: config, safetensors shards and index, ``preprocessor_config.json``).

        The vision tower, projector, language model and LM head are copied unchanged; the anchor
        projector and voco embeddings are freshly initialised. Give ``tokenizer`` (with ``<voco>``
        added, :func:`htc_vlm.data.tokenizer.add_htc_tokens`): the embeddings grow to its length and
        ``<voco>``'s id is read from it; or ``voco_token_id`` for a vocabulary that has it already.
        The image processing is the folder's ``preprocessor_config.json`` (llava-hf: resize and
        centre crop, CLIP normalisation). ``config_overrides`` set HTC options (``compression``,
        ``num_anchors``, ``discrete_channels``, ...).
        """
        from transformers import LlavaForConditionalGeneration

        folder = None
        if isinstance(llava, (str, Path)):
            folder = Path(llava)
            if not folder.is_dir() or not (folder / "config.json").is_file():
                raise HTCError(f"{llava} is not a local LLaVA checkpoint folder (no config.json); an original "
                               f"LLaVA checkpoint (mm_projector.*) converts with `htc-vlm convert-llava`")
            try:
                llava = LlavaForConditionalGeneration.from_pretrained(folder)
            except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
                raise HTCError(f"cannot load the LLaVA checkpoint in {folder}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from e
        lc = llava.config
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            if "<voco>" not in vocab:
                raise HTCError("the tokenizer has no <voco> token: add it first (htc_vlm.data.tokenizer.add_htc_tokens)")
            if vocab.get("<image>") != lc.image_token_id:
                raise HTCError(f"the tokenizer's <image> is id {vocab.get('<image>')}, the LLaVA checkpoint's "
                               f"image_token_id is {lc.image_token_id}: use the checkpoint's own tokenizer")
            voco_token_id = vocab["<voco>"]
        if voco_token_id is None:
            raise HTCError("from_llava needs the tokenizer (or voco_token_id)")
        if not isinstance(lc.vision_feature_layer, int):
            raise HTCError(f"LLaVA checkpoints with several vision feature layers are not supported ({lc.vision_feature_layer})")
        if lc.projector_hidden_act != "gelu":
            raise HTCError(f"the LLaVA projector uses {lc.projector_hidden_act!r}; htc-vlm's mlp2x_gelu needs 'gelu'")
        config = HTCConfig(vision_config=lc.vision_config.to_dict(), text_config=lc.text_config.to_dict(),
                           image_token_id=lc.image_token_id, voco_token_id=voco_token_id,
                           vision_feature_layer=lc.vision_feature_layer,
                           vision_feature_select_strategy=lc.vision_feature_select_strategy,
                           projector_type="mlp2x_gelu", projector_bias=lc.multimodal_projector_bias,
                           **config_overrides)
        model = cls(config).to(llava.dtype)
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
        new = tuple(f"model.{name}." for name in (*model.model.compression_modules, "voco_embeddings"))
        left = [k for k in missing if not k.startswith(new)]
        if unexpected or left:
            raise HTCError(f"LLaVA weights do not map onto HTC: unexpected {unexpected[:5]}, missing {left[:5]}")
        model.set_attn_implementation(llava.config._attn_implementation)
        if tokenizer is not None and len(tokenizer) > model.config.text_config.vocab_size:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # <voco>'s row: never read
        size = config.vision_config.image_size
        saved = ImageProcessing.load(folder, size) if folder is not None else None
        model.image_processing = saved or ImageProcessing.named(size, "clip", "crop")  # llava-hf's processor
        return model
