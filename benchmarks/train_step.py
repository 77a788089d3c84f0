"""Training-step time and peak memory of our model against transformers' LlavaForConditionalGeneration
of the same shape, weights and batch (issue #15, point 4), measured side by side in one run.

    python benchmarks/train_step.py [--shape tiny|7b] [--method htc|voco|none] [--attn sdpa|flex_attention]
        [--batch 2] [--text 128] [--reps 5] [--grad-ckpt] [--bf16]

One step = forward, backward and an SGD update (no optimizer state, so the 7B shape fits on one
80 GB+ GPU in bf16); the vision tower is frozen in both, as in the compress stage. Our model reads
the same image and text plus its voco token (and, for htc, the N_d anchors): the sequence is 1 (5)
tokens longer, which the ratio includes. Steps of the two models alternate, after one warm-up step
each; the median is printed. Peak memory is CUDA's max allocated (not measured on a CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from htc_vlm import HTCForConditionalGeneration
from htc_vlm.layout import image_prompt_ids

SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14),
             dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1000)),
    "7b": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, hidden_act="quick_gelu"),
           dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32064)),
}


def build(shape: str, method: str, attn: str, dtype, device):
    v, t = SHAPES[shape]
    vocab = t["vocab_size"]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v).to_dict(), text_config=LlamaConfig(**t).to_dict(),
                      image_token_id=vocab - 2, image_seq_length=(v["image_size"] // v["patch_size"]) ** 2)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(cfg).to(dtype)
    grid = v["image_size"] // 16
    ours = HTCForConditionalGeneration.from_llava(llava, voco_token_id=vocab - 1, compression=method,
                                                  discrete_channels=32, discrete_grid=grid).to(dtype)
    llava.set_attn_implementation("sdpa")
    ours.set_attn_implementation(attn)
    for m in (llava, ours):
        m.model.vision_tower.requires_grad_(False)
        m.to(device).train()
    return llava, ours, v["image_size"]


def batches(llava, ours, size: int, batch: int, text: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    n = llava.config.image_seq_length
    words = torch.randint(10, llava.config.text_config.vocab_size - 10, (batch, text), generator=g)
    pix = torch.randn(batch, 3, size, size, generator=g).to(device, dtype)
    theirs = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n), llava.config.image_token_id),
                        words], 1).to(device)
    head = torch.tensor(image_prompt_ids(ours.config, [1]))
    mine = torch.cat([head.expand(batch, -1), words], 1).to(device)
    q = torch.randn(batch, ours.config.discrete_dim, generator=g).to(device, dtype) if ours.config.needs_latents else None

    def labels(ids):
        lab = torch.full_like(ids, -100)
        lab[:, -text // 2:] = ids[:, -text // 2:]  # the answer half of the text
        return lab

    return (dict(input_ids=theirs, pixel_values=pix, labels=labels(theirs)),
            dict(input_ids=mine, pixel_values=pix, discrete_latents=q, labels=labels(mine)))


def step(model, inputs, lr=1e-5) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    ap.add_argument("--method", default="htc")
    ap.add_argument("--attn", choices=("sdpa", "eager", "flex_attention"), default="sdpa")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.attn == "flex_attention" and device == "cpu":
        raise SystemExit("flex_attention has no backward on a CPU (torch 2.13): use --attn sdpa here")
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    llava, ours, size = build(a.shape, a.method, a.attn, dtype, device)
    if a.grad_ckpt:
        for m in (llava, ours):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    theirs_in, ours_in = batches(llava, ours, size, a.batch, a.text, device, dtype)
    times, peaks = {"llava": [], "ours": []}, {}
    for name, m, x in (("llava", llava, theirs_in), ("ours", ours, ours_in)):
        step(m, x)  # warm-up (kernels, allocator, flex compilation)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(m, x)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(a.reps):
        times["llava"].append(step(llava, theirs_in))
        times["ours"].append(step(ours, ours_in))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"shape {a.shape}, method {a.method}, attention {a.attn} (LLaVA: sdpa), batch {a.batch}, text {a.text}, "
          f"{dtype}, grad ckpt {a.grad_ckpt}, {device}, {torch.get_num_threads()} threads")
    print(f"  sequence: LLaVA {theirs_in['input_ids'].shape[1]}, ours {ours_in['input_ids'].shape[1]}")
    for k in ("llava", "ours"):
        mem = f", peak {peaks[k]:.2f} GiB" if k in peaks else ""
        print(f"  {k:<6} step median {med[k] * 1e3:8.1f} ms over {a.reps}{mem}")
    print(f"  ratio ours / LLaVA: {med['ours'] / med['llava']:.3f}")


if __name__ == "__main__":
    main()
