"""HTCConfig: everything needed to rebuild an HTC-VLM, saved with every checkpoint.

The vision tower and the language model are any transformers models (sub-configs resolved with
``AutoConfig``); the rest are the paper's components and our compression options. No token count
is hard-coded anywhere else: the patch count, the anchor count and the voco count all come from
here.
"""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .data.images import IMAGE_NORMS
from .errors import HTCError

VISION_ATTENTIONS = ("causal", "isolated")
FUSIONS = ("pre", "post", "mean")
PROJECTORS = ("linear", "mlp2x_gelu")


class HTCConfig(PreTrainedConfig):
    r"""Configuration of :class:`~htc_vlm.HTCForConditionalGeneration`.

    Args:
        vision_config: any transformers vision model config (CLIP, SigLIP, ...).
        text_config: any transformers causal LM config (Llama, ...).
        image_token_id: id of the ``<image>`` placeholder; the prompt holds one per hybrid token.
        voco_token_id: id of the ``<voco>`` placeholder; ``num_voco`` of them follow the image block.
        vision_feature_layer: hidden layer of the vision tower to use (LLaVA-1.5: -2).
        vision_feature_select_strategy: ``"default"`` drops the CLS token, ``"full"`` keeps every token.
        vision_has_cls: whether the tower prepends a CLS token (CLIP: yes; SigLIP: no, use ``"full"``).
        projector_type: continuous projector P_v, ``"linear"`` or ``"mlp2x_gelu"`` (LLaVA-1.5).
        projector_norm: a LayerNorm on the vision features before P_v (off for LLaVA checkpoints).
            The embedded default turns it on: its from-scratch tower emits features of norm ~60,
            which made the projector's effective step size so large that colour and shape were
            learned or not depending on the learning rate and the tower's seed.
        discrete_channels, discrete_grid: shape of the VQ latent q, ``C x h x w`` with ``h = w =
            discrete_grid``; q arrives flattened, length ``C * h * w`` (MGVQ f16c32 at 336 px: 32 x 21
            x 21 = 14112). ``discrete_channels=0`` builds no discrete channel.
        num_anchors: N_d, the anchor tokens made from q by P_d (Eq. 4).
        anchor_hidden_size: width of P_d's hidden layer (default ``num_anchors * hidden``, as the
            paper's W1: 16384 x 14112 for N_d = 4 at 4096).
        compression: the name of a registered method's :class:`~htc_vlm.methods.compression.Compression`
            (``compression_spec``): ``"none"`` (upper bound, text sees every image token), ``"voco"`` (continuous
            only, VoCo-LLaMA), ``"htc"`` (anchors + patches) or ``"discrete"`` (every VQ position,
            projected, then voco); or a pooling baseline with no voco, the text attending
            straight to ``pool_tokens`` tokens made from the patches: ``"avgpool"`` (their
            mean) or ``"qformer"`` (learned queries cross-attending to them, BLIP-2 style).
        pool_tokens: visual tokens made by ``avgpool`` / ``qformer`` (Table 1: one).
        num_voco: voco tokens after the image block; the KV cache keeps only these.
        vision_attention: inside the image block, ``"causal"`` (VoCo-LLaMA's code) or
            ``"isolated"`` (each hybrid token sees only itself, the paper's Eq. 6).
        fusion: ``"pre"`` (anchors before the patches, the paper's default), ``"post"`` (after) or
            ``"mean"`` (the anchors' mean added to every patch token; this reading of the paper's
            "mean fusion" ablation is ours).
    """

    model_type = "htc_vlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    voco_token_id: int = 32001
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    vision_has_cls: bool = True
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    projector_norm: bool = False
    discrete_channels: int = 32
    discrete_grid: int = 21
    num_anchors: int = 4
    anchor_hidden_size: int | None = None
    compression: str = "htc"
    num_voco: int = 1
    pool_tokens: int = 1
    vision_attention: str = "causal"
    fusion: str = "pre"
    tie_word_embeddings: bool = False
    # The pixel normalisation the tower was trained with (data/images.py IMAGE_NORMS), saved with the
    # model so that every path (eval, compress, ask, lmms-eval) feeds it the pixels it learnt on.
    image_norm: str = "half"
    # The chat template the model was trained with (data/llava.py TEMPLATES): the default of every
    # command that builds prompts for it (eval, compress, ask, serve, lmms-eval).
    chat_template: str = "plain"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name, value, allowed in (
            ("vision_attention", self.vision_attention, VISION_ATTENTIONS),
            ("fusion", self.fusion, FUSIONS),
            ("projector_type", self.projector_type, PROJECTORS),
            ("vision_feature_select_strategy", self.vision_feature_select_strategy, ("default", "full")),
            ("image_norm", self.image_norm, tuple(IMAGE_NORMS)),
        ):
            if value not in allowed:
                raise HTCError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")
        if self.vision_feature_select_strategy == "default" and not self.vision_has_cls:
            raise HTCError("vision_feature_select_strategy='default' drops a CLS token, but vision_has_cls=False; use 'full'")
        if self.num_voco < 1:
            raise HTCError(f"num_voco must be at least 1, got {self.num_voco}")
        if self.pool_tokens < 1:
            raise HTCError(f"pool_tokens must be at least 1, got {self.pool_tokens}")
        self.compression_spec.validate(self)  # an unknown name is refused here, listing the known ones

    @property
    def compression_spec(self):
        """The :class:`~htc_vlm.methods.compression.Compression` named by ``compression``: every
        behaviour that depends on the method is asked of it."""
        from .methods.compression import get_compression

        return get_compression(self.compression)

    # ------------------------------------------------------------------ derived sizes

    @property
    def num_patches(self) -> int:
        """N: patch tokens per image from the vision tower (576 for CLIP-L/14 at 336 px)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side * side + (1 if self.vision_feature_select_strategy == "full" and self.vision_has_cls else 0)

    @property
    def discrete_dim(self) -> int:
        """Length of the flattened quantized latent q."""
        return self.discrete_channels * self.discrete_grid * self.discrete_grid

    @property
    def num_image_tokens(self) -> int:
        """Hybrid-block length: ``<image>`` placeholders per image under this config's compression."""
        return self.compression_spec.num_image_tokens(self)

    @property
    def compresses(self) -> bool:
        """Whether the disentanglement mask applies (text sees the image through voco only)."""
        return self.compression_spec.uses_voco

    @property
    def needs_latents(self) -> bool:
        """Whether each image also arrives as its discrete latent q (a feature store or a VQ tokenizer)."""
        return self.compression_spec.needs_latents
