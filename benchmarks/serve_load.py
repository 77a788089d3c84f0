"""Load benchmark for `htc-vlm serve`: the same weights served three ways, side by side in one run.

  (a) htc-vlm: one-token (voco) caches, the server's LRU bounded by BUDGET bytes;
  (b) uncompressed, each image's full KV cache kept (prefix caching), under the same BUDGET;
  (c) uncompressed, nothing kept: every request prefills its image again.

BUDGET is what ``--budget-images`` uncompressed images need (8 by default). Each mode starts a real
server on 127.0.0.1 and ``--clients`` concurrent httpx clients ask ``--images`` x ``--questions``
questions in a random order; the load is bounded in count and in time (``--max-seconds`` per mode).
Prints questions/s, tokens/s, p50 / p95 latency and how many images each mode keeps cached.

    python benchmarks/serve_load.py                     # the mid shape: 576 patches, 12 x 768, random weights
    python benchmarks/serve_load.py --preset tiny --images 16 --questions 2    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import statistics
import tempfile
import threading
import time

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from htc_vlm.data.tokenizer import save_tokenizer
from htc_vlm.efficiency import bench_config
from htc_vlm.modeling import HTCForConditionalGeneration
from htc_vlm.serving.app import create_app
from htc_vlm.serving.engine import Engine, Limits
from htc_vlm.serving.store import CacheStore

QUESTIONS = ["What color is the circle?", "How many objects are there?", "Is there a square in the image?",
             "What shape is at the top left?", "Where is the red object?", "What texture is the triangle?"]


def _images(n: int, size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _serve(engine: Engine, name: str):
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


async def _load(base: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int, max_seconds: float):
    latencies, tokens, errors = [], 0, 0
    todo = list(jobs)
    deadline = time.monotonic() + max_seconds

    async def client(http):
        nonlocal tokens, errors
        while todo and time.monotonic() < deadline:
            url, question = todo.pop()
            body = {"max_tokens": max_tokens, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}
            t0 = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                errors += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - t0, latencies, tokens, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid", help="bench shape: mid (576 patches, 12 x 768) or tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--questions", type=int, default=4, help="questions per image")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--budget-images", type=int, default=8, help="cache memory = this many uncompressed images")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="time limit per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-gap-ms", type=float, default=Limits.batch_gap_s * 1000,
                    help="the server's batch gap: a batch takes questions while they keep arriving this close")
    ap.add_argument("--batch-wait-ms", type=float, default=Limits.batch_wait_s * 1000,
                    help="the most a batch waits for more questions after its first")
    ap.add_argument("--modes", default="abc", help="which of the modes (a), (b), (c) to run")
    ap.add_argument("--profile-only", action="store_true", help="only time one compression and answer batches")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    voco = HTCForConditionalGeneration(bench_config(args.preset, compression="voco")).eval()
    upper = HTCForConditionalGeneration(bench_config(args.preset, compression="none")).eval()
    upper.load_state_dict(voco.state_dict(), strict=False)  # the same weights; voco is unused there
    with tempfile.TemporaryDirectory() as tmp:  # the scene tokenizer: questions only need some ids
        save_tokenizer(f"{tmp}/tok")
        tok = AutoTokenizer.from_pretrained(f"{tmp}/tok")
    size = voco.config.vision_config.image_size
    urls = _images(args.images, size, args.seed)
    jobs = [(u, QUESTIONS[k % len(QUESTIONS)]) for u in urls for k in range(args.questions)]
    random.Random(args.seed).shuffle(jobs)

    if args.profile_only:
        _profile(voco, tok, urls, args.max_tokens)
        return
    # what one uncompressed image's cache takes, measured on the model
    probe = Engine(upper, tok, CacheStore(0))
    full_bytes = asyncio.run(probe.add_image(base64.b64decode(urls[0].split(",", 1)[1])))[1].nbytes
    probe.close()
    budget = args.budget_images * full_bytes
    print(f"{args.preset}: {voco.config.num_patches} patches, {voco.config.text_config.num_hidden_layers} layers x "
          f"{voco.config.text_config.hidden_size}; {args.images} images x {args.questions} questions, "
          f"{args.clients} clients, {torch.get_num_threads()} threads; cache budget {budget / 2**20:.1f} MiB "
          f"({args.budget_images} uncompressed images)")

    rows, profiles = [], []
    modes = (("(a) htc-vlm, one-token caches", voco, budget), ("(b) uncompressed, image KV cached", upper, budget),
             ("(c) uncompressed, no cache", upper, 0))
    for name, model, memory in (m for m in modes if m[0][1] in args.modes):
        engine = Engine(model, tok, CacheStore(memory), limits=Limits(
            max_tokens=args.max_tokens, queue_size=4096, batch_gap_s=args.batch_gap_ms / 1000,
            batch_wait_s=args.batch_wait_ms / 1000))
        server, thread, base = _serve(engine, name)
        wall, lat, tokens, errors = asyncio.run(_load(base, jobs, args.clients, args.max_tokens, args.max_seconds))
        profiles.append((name, wall, _metrics(base)))
        server.should_exit = True
        thread.join(timeout=30)
        stats = engine.store.stats
        per_image = stats.bytes / max(stats.entries, 1)
        kept = int(memory // per_image) if stats.entries else 0
        lat.sort()
        rows.append((name, len(lat) / wall, tokens / wall, statistics.median(lat), lat[int(0.95 * (len(lat) - 1))],
                     kept, len(lat), errors, engine.compressions))
    print(f"\n{'mode':36} {'q/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'images cached':>14} {'asked':>6} "
          f"{'errors':>6} {'compressions':>12}")
    for r in rows:
        print(f"{r[0]:36} {r[1]:7.2f} {r[2]:7.1f} {r[3]:7.3f} {r[4]:7.3f} {r[5]:14d} {r[6]:6d} {r[7]:6d} {r[8]:12d}")
    print(f"\nwhere the time went (from /metrics) {'answer calls':>13} {'questions/call':>15} {'answering s':>12} "
          f"{'compress calls':>15} {'images/call':>12} {'compressing s':>14} {'idle s':>7}")
    for name, wall, (m, seconds) in profiles:
        answer, compress = seconds["answer"], seconds["compress"]
        calls, images = m["htc_batch_size_count"], m["htc_compress_batch_size_count"]
        print(f"{name:36} {calls:13.0f} {m['htc_batch_size_sum'] / max(calls, 1):15.1f} {answer:12.1f} "
              f"{images:15.0f} {m['htc_compress_batch_size_sum'] / max(images, 1):12.1f} {compress:14.1f} "
              f"{wall - answer - compress:7.1f}")
    if len(rows) < 3:
        return
    a, b, c = rows
    print(f"\n(a) / (b): {a[1] / b[1]:.2f}x questions/s, {a[5] / max(b[5], 1):.0f}x images cached; "
          f"(a) / (c): {a[1] / c[1]:.2f}x questions/s")


def _metrics(base: str) -> tuple[dict[str, float], dict[str, float]]:
    """The server's unlabelled Prometheus samples by name (``htc_batch_size_sum``, ...), and the
    model's seconds by kind of call (``htc_model_seconds{call=...}``)."""
    samples = [s for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text)
               for s in family.samples]
    return ({s.name: s.value for s in samples if not s.labels},
            {s.labels["call"]: s.value for s in samples if s.name == "htc_model_seconds"})


def _profile(model, tok, urls: list[str], max_tokens: int) -> None:
    """Where (a)'s time goes: compressions one at a time and in the server's batches of up to
    ``Limits.max_compress_batch``, and answer batches of 1 to 32 questions."""
    from htc_vlm.serving.engine import _Question

    engine = Engine(model, tok, CacheStore(0))
    n = engine.limits.max_compress_batch
    datas = [base64.b64decode(u.split(",", 1)[1]) for u in (urls * n)[:n]]
    engine._compress(datas[:1])  # warm-up
    t0 = time.perf_counter()
    caches = [c for d in datas for c in engine._compress([d])]
    one = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    engine._compress(datas)
    batched = (time.perf_counter() - t0) / n
    print(f"compress: {one:.3f} s per image one at a time, {batched:.3f} s per image in a batch of {n} "
          f"({one / batched:.2f}x)")
    loop = asyncio.new_event_loop()
    for b in (1, 2, 4, 8, 16, 32):
        group = [_Question(caches[i % len(caches)], engine.builder.question_ids(QUESTIONS[i % len(QUESTIONS)]),
                           max_tokens, 0.0, [], loop.create_future()) for i in range(b)]
        engine._answer(group)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine._answer(group)
            times.append(time.perf_counter() - t0)
        print(f"answer a batch of {b:2d} ({max_tokens} tokens each): {statistics.median(times):.3f} s "
              f"(median of 3), {b / statistics.median(times):.1f} questions/s")
    engine.close()


if __name__ == "__main__":
    main()
