"""Generation rate of the scene benchmark on one core: render + PNG encode, in scenes per second.

    python benchmarks/scenes_rate.py [--n 3000] [--size 64]
"""

import argparse
import os
import random
import time

import torch

from htc_vlm.data import scenes as S

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    rng = random.Random(0)
    t0 = time.perf_counter()
    for i in range(a.n):
        S.png_bytes(S.render(S.sample_scene(rng, f"s{i}", a.size), a.size))
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    qs = S.test_questions(S.sample_scenes("test", a.n, 0, a.size), seed=0)
    dq = time.perf_counter() - t1
    print(f"render+encode: {a.n / dt:,.0f} scenes/s at {a.size} px on one core; "
          f"questions: {a.n / dq:,.0f} scenes/s ({sum(map(len, qs.values())):,} questions)")
