"""``htc-vlm bench``: what one-token compression buys, measured side by side in one run.

The same weights run twice: uncompressed (every image token in the KV cache, the image prefilled
with each question, as a plain LLaVA does) and compressed (the image compressed once to its voco
cache, stored on disk, every question answered from it). Measured: KV bytes per image, the time
of ``compress``, time to first token from a stored cache against uncompressed prefill, decode
tokens per second, and the total time for 1, 4 and 16 questions per image (per-question times
measured here, composed as a user would spend them: one prefill per question uncompressed, one
compress then one cached answer per question compressed). Prefill FLOPs are counted analytically
from the config, and printed for the LLaVA-1.5-7B shape too. Weights are random: speed does not
depend on them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from .cache import VisualCache
from .configuration import HTCConfig
from .errors import HTCError
from .io import atomic_write_bytes
from .modeling import HTCForConditionalGeneration


@dataclass(frozen=True)
class BenchPreset:
    name: str
    vision: dict
    text: dict


BENCH_PRESETS = {
    "tiny": BenchPreset("tiny", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     image_size=48, patch_size=8),
                        dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=100)),
    # the language model dominates, as at 7B: 12 layers x 768 over 576 patch tokens
    "mid": BenchPreset("mid", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=336, patch_size=14),
                       dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)),
}


def bench_config(preset: str, compression: str = "htc") -> HTCConfig:
    if preset not in BENCH_PRESETS:
        raise HTCError(f"unknown bench preset {preset!r}; known: {', '.join(BENCH_PRESETS)}")
    p = BENCH_PRESETS[preset]
    vocab = p.text["vocab_size"]
    return HTCConfig(vision_config=CLIPVisionConfig(**p.vision).to_dict(), text_config=LlamaConfig(**p.text).to_dict(),
                     image_token_id=vocab - 2, voco_token_id=vocab - 1, discrete_channels=32, discrete_grid=4,
                     compression=compression, anchor_hidden_size=512)


def kv_bytes_per_token(config: HTCConfig, bytes_per_value: int = 2) -> int:
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim * bytes_per_value


def prefill_flops(config: HTCConfig, tokens: int, context: int = 0) -> float:
    """Language-model FLOPs to prefill ``tokens`` after ``context`` cached ones (matmuls only)."""
    t = config.text_config
    d, layers, inter = t.hidden_size, t.num_hidden_layers, t.intermediate_size
    head_dim = getattr(t, "head_dim", None) or d // t.num_attention_heads
    kv = t.num_key_value_heads * head_dim
    per_token = layers * (2 * d * (d + 2 * kv + d) + 2 * 3 * d * inter) + 2 * d * t.vocab_size
    attention = layers * 2 * 2 * d * tokens * (context + (tokens + 1) / 2)  # QK^T and AV, causal
    return per_token * tokens + attention


def analytic(config: HTCConfig, question_tokens: int, bytes_per_value: int = 2) -> dict:
    """Uncompressed = a plain LLaVA with the config's N patch tokens; compressed = this config."""
    per = kv_bytes_per_token(config, bytes_per_value)
    return {"kv_bytes_uncompressed": per * config.num_patches, "kv_bytes_compressed": per * config.num_voco,
            "prefill_flops_uncompressed": prefill_flops(config, config.num_patches + question_tokens),
            "compress_flops": prefill_flops(config, config.num_image_tokens + config.num_voco),
            "prefill_flops_from_cache": prefill_flops(config, question_tokens, context=config.num_voco)}


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def run_bench(model: HTCForConditionalGeneration, question_tokens: int = 20, answer_tokens: int = 16,
              reps: int = 3, questions_per_image=(1, 4, 16), seed: int = 0) -> dict:
    """Uncompressed against compressed on ``model``'s weights, one image."""
    if not model.config.compresses:
        raise HTCError("bench needs a compressing model (voco, htc or discrete): it is run uncompressed too")
    model = model.eval()
    config = model.config
    plain = HTCForConditionalGeneration(HTCConfig(**(config.to_dict() | {"compression": "none"}))).eval()
    plain.load_state_dict(model.state_dict(), strict=False)  # same weights; no anchors used
    plain.set_attn_implementation(config._attn_implementation or "sdpa")
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    pix = torch.randn(1, vc.num_channels, vc.image_size, vc.image_size, generator=g)
    q = torch.randn(1, config.discrete_dim, generator=g) if config.needs_latents else None
    special = {config.image_token_id, config.voco_token_id}
    vocab = [i for i in range(min(config.text_config.vocab_size, 1000)) if i not in special]
    question = torch.tensor([vocab[i % len(vocab)] for i in torch.randint(0, 10**6, (question_tokens,), generator=g)])[None]
    full_ids = torch.cat([torch.full((1, plain.config.num_image_tokens), config.image_token_id), question], 1)

    gen = dict(max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, do_sample=False,
               pad_token_id=0, eos_token_id=None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.safetensors"
        model.compress(pix, q).save(path)

        def uncompressed_prefill():
            return plain(input_ids=full_ids, pixel_values=pix, use_cache=True).logits[:, -1].argmax(-1)

        def compress():
            return model.compress(pix, q)

        def cached_first_token():
            cache = VisualCache.load(path)
            return model(**model.answer_inputs(cache, question)).logits[:, -1].argmax(-1)

        def uncompressed_answer():
            return plain.generate(question, pixel_values=pix, **gen)

        def cached_answer():
            return model.generate(question, visual_cache=VisualCache.load(path), **gen)

        def uncompressed_batch(k):  # k questions about the image, as one batch, each with the whole image
            return lambda: plain.generate(question.expand(k, -1), pixel_values=pix.expand(k, -1, -1, -1), **gen)

        def compressed_batch(k):  # compress once, then the k questions as one batch from the cache
            def run():
                cache = model.compress(pix, q)
                return model.generate(question.expand(k, -1), visual_cache=cache.select([0] * k), **gen)
            return run

        t = {name: _median_time(fn, reps) for name, fn in (
            ("uncompressed_prefill", uncompressed_prefill), ("compress", compress),
            ("ttft_from_cache", cached_first_token), ("uncompressed_answer", uncompressed_answer),
            ("cached_answer", cached_answer))}
        totals = {str(k): {"uncompressed": _median_time(uncompressed_batch(k), reps),
                           "compressed": _median_time(compressed_batch(k), reps)} for k in questions_per_image}
        cache_bytes = VisualCache.load(path).nbytes
    full_cache = plain.compress(pix)  # every image position kept
    decode = lambda total, first: (answer_tokens - 1) / max(total - first, 1e-9)  # noqa: E731
    per_token = kv_bytes_per_token(config, torch.finfo(next(model.parameters()).dtype).bits // 8)
    result = {
        "config": {"layers": config.text_config.num_hidden_layers, "hidden": config.text_config.hidden_size,
                   "image_tokens_uncompressed": plain.config.num_image_tokens,
                   "image_tokens_compressed_input": config.num_image_tokens, "num_voco": config.num_voco,
                   "question_tokens": question_tokens, "answer_tokens": answer_tokens,
                   "threads": torch.get_num_threads()},
        "kv_bytes_per_image": {"uncompressed": full_cache.nbytes, "compressed": cache_bytes,
                               "ratio": full_cache.nbytes / cache_bytes},
        "seconds": t,
        "ttft_speedup": t["uncompressed_prefill"] / t["ttft_from_cache"],
        "compress_over_prefill": t["compress"] / t["uncompressed_prefill"],
        "decode_tokens_per_second": {"uncompressed": decode(t["uncompressed_answer"], t["uncompressed_prefill"]),
                                     "compressed": decode(t["cached_answer"], t["ttft_from_cache"])},
        "total_seconds": totals,  # measured whole: k questions of one image answered as one batch
        "analytic": analytic(config, question_tokens, bytes_per_value=per_token // kv_bytes_per_token(config, 1)),
    }
    from .presets import _llava_7b

    llava = _llava_7b(vocab_size=32002, image_token_id=32000, voco_token_id=32001, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, compression="htc")
    result["analytic_llava_1_5_7b"] = analytic(llava, question_tokens)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    s, kv = r["seconds"], r["kv_bytes_per_image"]
    rows = [("KV cache per image (bytes)", f"{kv['uncompressed']:,}", f"{kv['compressed']:,}", f"{kv['ratio']:.0f}x smaller"),
            ("time to first token (s)", f"{s['uncompressed_prefill']:.4f}", f"{s['ttft_from_cache']:.4f}",
             f"{r['ttft_speedup']:.1f}x faster"),
            ("compress (s)", f"prefill {s['uncompressed_prefill']:.4f}", f"{s['compress']:.4f}",
             f"{r['compress_over_prefill']:.2f}x the prefill"),
            ("decode (tokens/s)", f"{r['decode_tokens_per_second']['uncompressed']:.1f}",
             f"{r['decode_tokens_per_second']['compressed']:.1f}", "")]
    for k, v in r["total_seconds"].items():
        rows.append((f"total, {k} question(s) (s)", f"{v['uncompressed']:.3f}", f"{v['compressed']:.3f}",
                     f"{v['uncompressed'] / v['compressed']:.1f}x"))
    a, b = r["analytic"], r["analytic_llava_1_5_7b"]
    rows.append(("prefill GFLOPs (analytic)", f"{a['prefill_flops_uncompressed'] / 1e9:.2f}",
                 f"{a['prefill_flops_from_cache'] / 1e9:.2f}", "from cache"))
    rows.append(("LLaVA-1.5-7B KV per image (MB, bf16)", f"{b['kv_bytes_uncompressed'] / 1e6:.1f}",
                 f"{b['kv_bytes_compressed'] / 1e6:.2f}", f"{b['kv_bytes_uncompressed'] / b['kv_bytes_compressed']:.0f}x"))
    rows.append(("LLaVA-1.5-7B prefill TFLOPs (analytic)", f"{b['prefill_flops_uncompressed'] / 1e12:.2f}",
                 f"{b['prefill_flops_from_cache'] / 1e12:.3f}",
                 f"{b['prefill_flops_uncompressed'] / b['prefill_flops_from_cache']:.0f}x"))
    return rows


def write_outputs(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "bench.json", (json.dumps(result, indent=1) + "\n").encode())
    written = [out / "bench.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    ks = list(result["total_seconds"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = range(len(ks))
    axes[0].bar([i - 0.2 for i in x], [result["total_seconds"][k]["uncompressed"] for k in ks], 0.4, label="uncompressed")
    axes[0].bar([i + 0.2 for i in x], [result["total_seconds"][k]["compressed"] for k in ks], 0.4, label="compressed")
    axes[0].set_xticks(list(x), [f"{k} q" for k in ks])
    axes[0].set_ylabel("seconds per image")
    axes[0].set_title("total time, questions per image")
    axes[0].legend()
    kv = result["kv_bytes_per_image"]
    axes[1].bar(["uncompressed", "compressed"], [kv["uncompressed"], kv["compressed"]], color=["C0", "C1"])
    axes[1].set_yscale("log")
    axes[1].set_title(f"KV cache per image (bytes), {kv['ratio']:.0f}x")
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)
    return written + [out / "bench.png"]
