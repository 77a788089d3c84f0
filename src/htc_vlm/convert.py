"""Original LLaVA checkpoints (haotian-liu/LLaVA, e.g. ``liuhaotian/llava-v1.5-7b``) to the llava-hf
layout that :meth:`HTCForConditionalGeneration.from_llava` and ``htc-vlm train model.llava=`` read.

The original layout is a Llama checkpoint (``model.embed_tokens``, ``model.layers.*``, ``lm_head``)
with ``model.mm_projector.{0,2}`` (mlp2x_gelu) and, when the tower was saved with it,
``model.vision_tower.vision_tower.vision_model.*``; its ``config.json`` says how the tower is read
(``mm_vision_select_layer``, ``mm_vision_select_feature``) and how images were fed
(``image_aspect_ratio: pad``). Released checkpoints leave the tower out (it is
``openai/clip-vit-large-patch14-336``): pass its folder as ``vision_tower``. Weights are read from
safetensors, or from ``pytorch_model*.bin`` with ``torch.load(weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .data.processor import ImageProcessing
from .data.tokenizer import add_htc_tokens
from .errors import HTCError
from .io import atomic_dir

# original name -> llava-hf (transformers 5 LlavaForConditionalGeneration) name
RENAMES = (
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.", "model.vision_tower."),
    (r"^model\.(embed_tokens|layers|norm)\b", r"model.language_model.\1"),
    (r"^lm_head\.", "lm_head."),
)
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}  # LLaVA's mm_vision_select_feature


def rename(key: str) -> str | None:
    for pattern, repl in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: ``*.safetensors`` if any, else ``pytorch_model*.bin``."""
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            out.update(load_file(f))
        return out
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise HTCError(f"no weights in {folder} (*.safetensors or pytorch_model*.bin)")
    for f in files:
        try:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # weights_only refuses anything but tensors and containers
            raise HTCError(f"cannot read {f} as plain tensors (weights_only=True): {e}") from e
    return out


def convert_llava(src: str | Path, out: str | Path, vision_tower: str | Path | None = None,
                  overwrite: bool = False) -> Path:
    """Write ``out``: an llava-hf folder (config, safetensors, tokenizer with ``<image>`` and ``<voco>``,
    ``preprocessor_config.json``) from the original LLaVA checkpoint in ``src``."""
    from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HTCError(f"{out} exists and is not empty; pass --overwrite to replace it")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise HTCError(f"{src} is not a checkpoint folder (no config.json)")
    raw = json.loads(cfg_path.read_text())
    if "mm_projector_type" not in raw and "mm_hidden_size" not in raw:
        raise HTCError(f"{src} is not an original LLaVA checkpoint (its config.json has no mm_projector_type)")
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise HTCError(f"mm_projector_type {raw.get('mm_projector_type')!r} is not supported (LLaVA-1.5: mlp2x_gelu)")
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        raise HTCError("checkpoints with image start / end or patch tokens (mm_use_im_start_end) are not supported")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise HTCError(f"mm_vision_select_feature {feature!r} is not supported; known: {', '.join(SELECT_FEATURE)}")

    weights = read_weights(src)
    state, unknown = {}, []
    for k, v in weights.items():
        new = rename(k)
        if new is None:
            unknown.append(k)
        else:
            state[new] = v
    if unknown:
        raise HTCError(f"{len(unknown)} tensors of {src} have no llava-hf name (e.g. {unknown[0]}): not a LLaVA-1.5 checkpoint")
    has_tower = any(k.startswith("model.vision_tower.") for k in state)
    tower_dir = Path(vision_tower) if vision_tower else None
    if tower_dir is not None:
        if not (tower_dir / "config.json").is_file():
            raise HTCError(f"vision tower {tower_dir} is not a model folder (no config.json)")
        vision_cfg = CLIPVisionConfig.from_pretrained(tower_dir)
        if not has_tower:
            tower = CLIPVisionModel.from_pretrained(tower_dir)  # a CLIPVisionModel or a whole CLIPModel folder
            state.update({f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    elif has_tower:
        raise HTCError("give the vision tower's folder too (its config: hidden size, patch size, image size)")
    else:
        raise HTCError(f"{src} has no vision tower weights (released LLaVA-1.5 leaves CLIP out): give the folder "
                       f"of {raw.get('mm_vision_tower', 'openai/clip-vit-large-patch14-336')} as vision_tower")

    tok = AutoTokenizer.from_pretrained(src)
    add_htc_tokens(tok)
    text_keys = set(LlamaConfig().to_dict())
    text = LlamaConfig(**{k: v for k, v in raw.items() if k in text_keys and k not in ("architectures", "model_type")})
    text.pad_token_id = tok.pad_token_id
    config = LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=text.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
                         vision_feature_select_strategy=SELECT_FEATURE[feature], projector_hidden_act="gelu",
                         image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    # CLIP's checkpoints name the tower's tensors vision_model.*; transformers 5's module drops that level
    flat = not any(k.startswith("model.vision_tower.vision_model.") for k in expected)
    if flat:
        state = {k.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1): v for k, v in state.items()}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise HTCError(f"the converted weights do not fit LlavaForConditionalGeneration: missing {missing[:3]}, "
                       f"unexpected {extra[:3]}")
    dtype = next((v.dtype for k, v in state.items() if k.startswith("model.language_model.") and v.is_floating_point()),
                 torch.float32)  # kept as published (float16 for LLaVA-1.5), not doubled to float32
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True)
    if len(tok) > config.text_config.vocab_size:  # <image> / <voco> are new rows, mean-initialised
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    processing = ImageProcessing.load(tower_dir, vision_cfg.image_size) or ImageProcessing.named(
        vision_cfg.image_size, "clip", "crop")
    if raw.get("image_aspect_ratio", "square") == "pad":
        processing = ImageProcessing(processing.size, "pad", processing.mean, processing.std)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        processing.save(tmp)
    return out
