"""Tiny random checkpoints in published layouts, written to folders: llava-hf
(``llava-hf/llava-1.5-7b-hf``) and the original LLaVA (``liuhaotian/llava-v1.5-7b``), with a
Llama-style tokenizer (SentencePiece-like BPE: ``▁`` word prefixes, byte fallback for ``\\n``)."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration)

from htc_vlm.data.images import CLIP_MEAN, CLIP_STD

WORDS = ("A chat between a curious user and an artificial intelligence assistant . The gives helpful , detailed , "
         "polite answers to the user 's questions USER ASSISTANT What colour is the ball ? red Where it left "
         "Describe image blue big small").split()


def llama_tokenizer() -> LlamaTokenizer:
    """Every word of ``WORDS`` is one token, with and without its ``▁``; anything else falls back to
    bytes, like Llama-2's tokenizer (``legacy=False``)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []

    def add(t):
        vocab.setdefault(t, len(vocab))

    add("▁")
    words = sorted(set(WORDS) | {":", "?", "."})
    # Each word's merges grow it from its first character; all "▁word" chains rank before the bare
    # ones, so a bare piece ("an", "it") never splits a longer "▁word" ("▁assistant", "▁polite").
    for piece in [f"▁{w}" for w in words] + words:
        for c in piece:
            add(c)
        cur = piece[0]
        for c in piece[1:]:
            if (cur, c) not in merges:
                merges.append((cur, c))
            cur += c
            add(cur)
    return LlamaTokenizer(vocab=vocab, merges=merges)


def clip_config(size=56, patch=14) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=size, patch_size=patch, projection_dim=16)


def clip_processor_file(size=56) -> dict:
    """openai/clip-vit-large-patch14-336's preprocessor_config.json, at ``size``."""
    return {"crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "resample": 3, "size": size}


def write_clip(folder: Path, seed=0) -> Path:
    torch.manual_seed(seed)
    CLIPVisionModel(clip_config()).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(clip_processor_file()))
    return folder


def _llama(vocab: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512)


def write_llava_hf(folder: Path, seed=0) -> Path:
    """llava-hf's files: config.json (LlavaConfig), safetensors shards + index, a tokenizer with
    ``<image>`` and ``<pad>`` added, preprocessor_config.json (CLIPImageProcessor: resize + crop),
    chat_template.json."""
    tok = llama_tokenizer()
    tok.add_tokens(["<image>", "<pad>"], special_tokens=True)
    tok.pad_token = "<pad>"
    text = _llama(len(tok))
    text.pad_token_id = tok.pad_token_id
    cfg = LlavaConfig(vision_config=clip_config().to_dict(), text_config=text.to_dict(),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder, max_shard_size="100KB")  # shards + index
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "do_convert_rgb": True,
         "do_resize": True, "size": {"shortest_edge": 56}, "resample": 3, "do_center_crop": True,
         "crop_size": {"height": 56, "width": 56}, "do_rescale": True, "rescale_factor": 1 / 255,
         "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{% for m in messages %}...{% endfor %}"}))
    return folder


def write_original_llava(folder: Path, seed=0, with_tower=False, bin_weights=False) -> Path:
    """liuhaotian/llava-v1.5-7b's files: config.json (LlavaLlamaForCausalLM, mm_* keys, image_aspect_ratio
    pad), weights named model.embed_tokens / model.layers / model.mm_projector.{0,2} / lm_head (the
    tower only ``with_tower``), the Vicuna tokenizer (no <image>)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = llama_tokenizer()
    tok.save_pretrained(folder)
    text = _llama(len(tok))
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=clip_config().to_dict(), text_config=text.to_dict(),
                                                      image_token_id=0, image_seq_length=16))
    state = {}
    for k, v in llava.state_dict().items():
        for ours, theirs in (("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                             ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                             ("model.language_model.", "model."),
                             ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."), ("lm_head.", "lm_head.")):
            if k.startswith(ours):
                if theirs.startswith("model.vision_tower") and not with_tower:
                    break
                state[theirs + k[len(ours):]] = v.clone().half()
                break
    if bin_weights:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors")
    raw = text.to_dict() | {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
                            "mm_hidden_size": 32, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                            "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                            "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(raw))
    return folder, llava


def write_images(folder: Path, sizes=((80, 56), (56, 90), (56, 56)), seed=0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out
