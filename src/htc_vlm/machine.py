"""What a result was computed on: the processor, the kernels torch picked for it, and the versions that move
a result.

Two machines can train two different models from the same seed and command: torch dispatches its CPU kernels
by the instruction set (AVX2 or AVX-512), and these round differently. On the embedded default that gave
another seed-0 base on an AVX2-only machine than on the AVX-512 ones (docs/LOG.md, session 35), and a
dependency's minor release gave another VQ tokenizer (session 34). So every call of ``htc-vlm reproduce``
records :func:`describe` in its run record, and the report says when one run's stages came from more than
one of them.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

# the libraries whose version changed (or could change) a figure of the embedded default
PACKAGES = ("torch", "transformers", "accelerate", "vector-quantize-pytorch", "tokenizers", "numpy", "pillow")


def _cpu_model() -> str:
    """The first processor's name and, where the name is vague (a cloud's "AMD EPYC"), its family and model."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    generation = f" (family {info['cpu family']} model {info['model']})" if "cpu family" in info and "model" in info else ""
    return info["model name"] + generation


def cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe() -> dict:
    """This process's machine: CPU model and the instruction set torch's CPU kernels use, usable cores,
    GPU (or None), Python and the versions of :data:`PACKAGES` (None where not installed)."""
    import torch

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": cores(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "packages": {p: ver(p) for p in PACKAGES}}


def arithmetic(m: dict) -> dict:
    """The part of a :func:`describe` record that decides the numbers (not the core count): two calls that
    agree here compute the same stage the same way for a given thread count."""
    return {k: m.get(k) for k in ("cpu", "cpu_capability", "gpu", "packages")}


def summary(m: dict) -> str:
    """One line for a report: ``AMD EPYC (AVX2), 2 cores, torch 2.13.0, ...``."""
    pk = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if v)
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m.get('cpu')} ({m.get('cpu_capability')}), {m.get('cores')} cores{gpu}, Python {m.get('python')}, {pk}"
