"""How long a LLaVA-665k-sized training file takes to reach its first step (issue #15, point 5).

Writes a synthetic file of the shape of ``llava_v1_5_mix665k.json`` (665,298 records, multi-turn,
most with an image, many records per image) and small image files, then times what
``htc-vlm train`` does before its first step, each part on its own line: building
:class:`~htc_vlm.data.llava.LlavaDataset` (every record and image header checked), the lengths for
length-grouped batches, and the first batch of 16 items; once as a first start (the JSON parsed and
indexed, data/records.py) and once as a restart (another stage, a resumed run: the index read, the
images stat-ed instead of opened).

    python benchmarks/llava665k_startup.py [--records 665298] [--images 120000] [--out /tmp/llava665k]
        [--pack]

The images are 64 x 64 grey PNGs (only their headers are read before the first step). The tokenizer is
the embedded word-level one (the scene words), so tokenization costs are of the same order as a fast
BPE tokenizer's, not equal to Vicuna's.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("what colour is the ball cube left right big small red blue green yellow there a an of on in "
         "how many objects describe image answer with single word or phrase yes no").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_data(out: Path, records: int, images: int, seed: int = 0) -> Path:
    """The synthetic file and its images (skipped when already written)."""
    data = out / "llava_v1_5_mix665k.json"
    if data.exists():
        return data
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.full((64, 64, 3), 127, dtype=np.uint8)  # ~100-byte files: only headers are read here
    for i in range(images):
        p = img_dir / f"{i:07d}.png"
        if not p.exists():
            Image.fromarray(pixels).save(p)
    rng = random.Random(seed)
    recs = []
    for i in range(records):
        turns = []
        for t in range(rng.choice((1, 1, 2, 3, 5, 8))):  # LLaVA-665k: 1 to ~10 turns, ~2.5 on average
            q = _sentence(rng, rng.randint(5, 20)) + "?"
            turns += [{"from": "human", "value": ("<image>\n" if t == 0 and i % 25 else "") + q},
                      {"from": "gpt", "value": _sentence(rng, rng.randint(1, 40))}]
        rec = {"id": str(i), "conversations": turns}
        if i % 25:  # ~4% text-only records (ShareGPT), the rest with one of the images
            rec["image"] = f"{rng.randrange(images):07d}.png"
        recs.append(rec)
    data.write_text(json.dumps(recs))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=665_298)
    ap.add_argument("--images", type=int, default=120_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/llava665k"))
    ap.add_argument("--pack", action="store_true", help="pack_by_image=True (tokenizes every record up front)")
    a = ap.parse_args()

    import torch
    from transformers import CLIPVisionConfig

    from htc_vlm.data.llava import Collator, LlavaDataset
    from htc_vlm.data.processor import ImageProcessing
    from htc_vlm.data.tokenizer import build_tokenizer
    from htc_vlm.presets import build_config

    t0 = time.perf_counter()
    data = write_data(a.out, a.records, a.images)
    print(f"synthetic data ready: {data} ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    tok = build_tokenizer([" ".join(WORDS)])
    config = build_config("tiny", tok, vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=4, image_size=64, patch_size=16),
                          compression="voco")
    import os
    import shutil
    import tempfile

    os.environ["HTC_VLM_CACHE"] = cache = tempfile.mkdtemp(prefix="htc-cache-")  # a first start, then a restart
    print(f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    for start_kind in ("first start (parse, check, write the index)", "restart (the index, images stat-ed)"):
        times = {}
        start = time.perf_counter()
        ds = LlavaDataset(data, a.out / "images", tok, config, max_length=2048,
                          processing=ImageProcessing.named(64), pack_by_image=a.pack)
        times["dataset (records and images checked)"] = time.perf_counter() - start
        t = time.perf_counter()
        lengths = ds.lengths()
        times["lengths (length-grouped sampler)"] = time.perf_counter() - t
        t = time.perf_counter()
        batch = Collator(tok.pad_token_id)([ds[i] for i in range(16)])
        times["first batch of 16"] = time.perf_counter() - t
        total = time.perf_counter() - start
        print(f"{start_kind}: {len(ds.records):,} records, {len(ds.records.images):,} images, {len(ds):,} items; "
              f"batch {tuple(batch['input_ids'].shape)}, max length {max(lengths)}")
        for k, v in times.items():
            print(f"  {k:<48} {v:7.1f} s")
        print(f"  {'time to the first step':<48} {total:7.1f} s")
    shutil.rmtree(cache, ignore_errors=True)

if __name__ == "__main__":
    main()
