"""Named model architectures: the embedded ``tiny`` default and the paper's ``llava-1.5-7b``.

A registry, not path sniffing: an unknown name is an error listing the known ones.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig

from .configuration import HTCConfig
from .errors import HTCError


TINY_IMAGE_SIZE = 48  # the embedded default's scenes: a 3 x 3 grid of 16 px cells
TINY_PATCH_SIZE = 8  # 6 x 6 = 36 patch tokens, each grid cell 2 x 2 patches: an object spans several
TINY_VQ_DOWNSAMPLE = 4  # vq_preset("tiny"): q = 32 x 12 x 12 at 48 px


def tiny_vision_config(image_size: int = TINY_IMAGE_SIZE, patch_size: int = TINY_PATCH_SIZE) -> CLIPVisionConfig:
    """A from-scratch CLIP-style tower for the scenes: 48 px / patch 8 -> 36 patch tokens, so one token
    is a 36:1 compression and pooling mixes the patches of several objects and of the background.
    (Up to the session-4 rework: 64 px / patch 21, one patch per object, 9 tokens.)"""
    return CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            image_size=image_size, patch_size=patch_size, hidden_act="gelu")


def _tiny(vocab_size: int, image_token_id: int, voco_token_id: int, pad_token_id: int, bos_token_id: int,
          eos_token_id: int, **overrides) -> HTCConfig:
    text = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=1024,
                       pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       tie_word_embeddings=False)
    vision = overrides.pop("vision_config", None) or tiny_vision_config()
    vision = vision if isinstance(vision, dict) else vision.to_dict()
    args = dict(vision_config=vision, text_config=text.to_dict(),
                image_token_id=image_token_id, voco_token_id=voco_token_id,
                vision_feature_layer=-1,  # a tower trained for the VLM: its last layer is the useful one
                projector_type="mlp2x_gelu", projector_norm=True,  # see HTCConfig.projector_norm
                discrete_channels=32, discrete_grid=vision["image_size"] // TINY_VQ_DOWNSAMPLE, compression="none")
    return HTCConfig(**(args | overrides))


def _llava_7b(vocab_size: int, image_token_id: int, voco_token_id: int, pad_token_id: int, bos_token_id: int,
              eos_token_id: int, **overrides) -> HTCConfig:
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 (layer -2, CLS dropped), mlp2x_gelu, Vicuna-7B v1.5; MGVQ f16c32."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=vocab_size, max_position_embeddings=4096,
                       pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       rms_norm_eps=1e-5)
    args = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                voco_token_id=voco_token_id, vision_feature_layer=-2, projector_type="mlp2x_gelu",
                discrete_channels=32, discrete_grid=21, compression="none")
    return HTCConfig(**(args | overrides))


ARCHITECTURES = {"tiny": _tiny, "llava-1.5-7b": _llava_7b}


def build_config(name: str, tokenizer, **overrides) -> HTCConfig:
    """The HTCConfig of architecture ``name`` for ``tokenizer`` (which must know <image> and <voco>)."""
    if name not in ARCHITECTURES:
        raise HTCError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    vocab = tokenizer.get_vocab()
    for t in ("<image>", "<voco>"):
        if t not in vocab:
            raise HTCError(f"the tokenizer has no {t} token; add it (tokenizer.add_tokens) before training")
    return ARCHITECTURES[name](
        vocab_size=len(tokenizer), image_token_id=vocab["<image>"], voco_token_id=vocab["<voco>"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **overrides)
