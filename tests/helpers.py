"""Tiny random models for tests: CPU, seconds (CLIP 56 px / patch 14 -> 16 patches, Llama 2 layers)."""

import importlib.util
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from htc_vlm import HTCConfig, HTCForConditionalGeneration
from htc_vlm.layout import left_pad as _left_pad

IMAGE_ID, VOCO_ID, VOCAB = 298, 299, 300


def vision_config(**kw):
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=56, patch_size=14, **kw)


def text_config(**kw):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, **kw)


def tiny_config(**kw) -> HTCConfig:
    args = dict(vision_config=vision_config().to_dict(), text_config=text_config().to_dict(),
                image_token_id=IMAGE_ID, voco_token_id=VOCO_ID, discrete_channels=4, discrete_grid=3)
    return HTCConfig(**(args | kw))


def tiny_model(attn="sdpa", seed=0, **kw) -> HTCForConditionalGeneration:
    torch.manual_seed(seed)
    model = HTCForConditionalGeneration(tiny_config(**kw)).eval()
    model.set_attn_implementation(attn)
    return model


def images(config, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(b, 3, 56, 56, generator=g)
    q = torch.randn(b, config.discrete_dim, generator=g)
    return pix, q


def left_pad(rows, pad=0):
    """Left-pad lists of ids: (ids, attention_mask)."""
    return _left_pad(rows, pad)


SMALL = ["optim.per_device_train_batch_size=2", "optim.logging_steps=1", "data.max_length=400"]


def train_args(run, stage: str, out: str, *extra: str) -> list[str]:
    """``htc-vlm train`` overrides for a stage on a ``tiny_run`` folder (scenes + features), writing run/out."""
    s = run / "scenes"
    return [f"stage={stage}", f"output_dir={run / out}", f"data.images={s / 'images'}",
            f"data.tokenizer={s / 'tokenizer'}", f"data.features={run / 'features.safetensors'}",
            f"data.scenes={s / 'train' / 'scenes.jsonl'}", f"data.conversations={s / 'train' / 'conversations.json'}",
            *SMALL, *extra]


def benchmark_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
