"""The seam of the trained methods: what a compression is to the model, in one small protocol.

``HTCConfig.compression`` names one :class:`Compression`; the model, the data pipeline, training,
inference and the analyses ask it, never compare the name:

- :meth:`Compression.modules` builds the method's own modules (attribute name -> module on ``HTCModel``;
  the name is the checkpoint's parameter prefix ``model.<name>.``, trained by the compress stage);
- :meth:`Compression.image_block` makes the tokens that fill the ``<image>`` placeholders from the
  pixels and, where :attr:`needs_latents`, the image's discrete latent q;
- :meth:`Compression.num_image_tokens` says how many placeholders that block takes;
- :attr:`uses_voco` says whether the disentanglement mask applies (text sees the image through voco only);
- :meth:`Compression.validate` refuses a config the method cannot run.

A new trained method is one file in this package: a subclass registered with
:func:`~htc_vlm.methods.registry.trained_method` (see ``voco.py`` for the smallest one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import HTCError

if TYPE_CHECKING:  # only for annotations: this module is imported by configuration.py at run time
    import torch
    from torch import nn

    from ..configuration import HTCConfig
    from ..modeling import HTCModel


class Compression:
    name: str = ""
    uncompressed: bool = False  # every image token reaches the text: the upper bound ("none") alone
    uses_voco: bool = True  # text reaches the image only through the voco tokens (the mask of Eq. 6)
    needs_latents: bool = False  # reads the discrete latent q of each image (a feature store or a VQ tokenizer)
    reads_pixels: bool = True  # the block is made from pixel_values (False: from q alone)
    budget_key: str = "num_voco"  # the config key that sets the visual tokens the text (or the KV cache) keeps

    def validate(self, config: HTCConfig) -> None:
        """Raise an :class:`HTCError` naming what ``config`` lacks for this method."""
        if self.needs_latents and config.discrete_dim == 0:
            raise HTCError(f"compression={self.name!r} needs a discrete channel (discrete_channels > 0)")

    def num_image_tokens(self, config: HTCConfig) -> int:
        """``<image>`` placeholders per image: the length of :meth:`image_block`'s output."""
        return config.num_patches

    def num_anchors(self, config: HTCConfig) -> int:
        """How many tokens at the start of the image block are discrete anchors (analyses label them)."""
        return 0

    def modules(self, config: HTCConfig) -> dict[str, nn.Module]:
        """The method's own modules, built with the model (none unless the method has some)."""
        return {}

    def unused_modules(self, config: HTCConfig) -> tuple[str, ...]:
        """Modules of ``HTCModel`` the method never runs (kept frozen in training: DDP needs it)."""
        return () if self.uses_voco else ("voco_embeddings",)

    def image_block(self, model: HTCModel, pixel_values: torch.Tensor | None,
                    q: torch.Tensor | None) -> torch.Tensor:
        """Eq. 5: (B, 3, H, W) pixels (and (B, Q) latents) -> (B, num_image_tokens, D)."""
        return model.patch_embeddings(pixel_values)


COMPRESSIONS: dict[str, Compression] = {}


def register_compression(compression: Compression) -> Compression:
    if not compression.name:
        raise ValueError(f"{type(compression).__name__} has no name")
    if compression.name in COMPRESSIONS:
        raise ValueError(f"compression {compression.name!r} registered twice")
    COMPRESSIONS[compression.name] = compression
    return compression


def known_compressions() -> tuple[str, ...]:
    from . import registry  # noqa: F401  (importing the package registers every shipped method)

    return tuple(COMPRESSIONS)


def get_compression(name: str) -> Compression:
    """Asked on every forward (``config.compresses``): a dict lookup; the registry is imported on a miss only."""
    if name not in COMPRESSIONS and name not in known_compressions():
        raise HTCError(f"unknown compression {name!r}; known: {', '.join(COMPRESSIONS)}")
    return COMPRESSIONS[name]


class PooledCompression(Compression):
    """A pooling baseline: the patches reduced to ``pool_tokens`` tokens by ``pooler`` (a module class
    taking the config) that the text attends to directly, with no voco and no disentanglement mask."""

    uses_voco = False
    budget_key = "pool_tokens"
    pooler: type | None = None

    def validate(self, config):
        super().validate(config)
        if not 1 <= config.pool_tokens <= config.num_patches:
            raise HTCError(f"pool_tokens must be between 1 and the {config.num_patches} patches, got {config.pool_tokens}")

    def num_image_tokens(self, config):
        return config.pool_tokens

    def modules(self, config):
        return {"visual_pooler": self.pooler(config)}

    def image_block(self, model, pixel_values, q):
        return model.visual_pooler(model.patch_embeddings(pixel_values))  # (B, N, D) -> (B, pool_tokens, D)
