"""Training the multi-group VQ tokenizer: progress, periodic safetensors checkpoints, resume, metrics.

An output folder holds the latest checkpoint (``config.json``, ``model.safetensors``,
``optimizer.safetensors``, ``state.json``), ``metrics.jsonl`` (one line per evaluation) and
``recon_{step}.png`` grids (originals above, reconstructions below). Held-out images are the
``test_*`` files of a scene-benchmark image folder, or else every 20th image.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..data.images import list_images, load_rgb, to_tensor
from ..errors import HTCError
from ..io import atomic_dir, atomic_write_bytes
from .model import MultiGroupVQ, VQConfig


@dataclass(frozen=True)
class VQTrainConfig:
    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 50
    eval_every: int = 200
    eval_images: int = 200
    seed: int = 0


def load_image_tensors(files: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]; grey / RGBA converted, wrong sizes refused by name."""
    return torch.stack([to_tensor(load_rgb(f, size)) for f in files])


def split_held_out(files: list[Path]) -> tuple[list[Path], list[Path]]:
    held = [f for f in files if f.name.startswith("test_")]
    if held and len(held) < len(files):
        return [f for f in files if not f.name.startswith("test_")], held
    return [f for i, f in enumerate(files) if i % 20], files[::20]


@torch.no_grad()
def evaluate(model: MultiGroupVQ, images: torch.Tensor, batch: int = 100) -> tuple[dict, torch.Tensor]:
    """PSNR (dB, images in [0, 1]), codebook usage and perplexity per group; and the reconstructions."""
    was = model.training
    model.eval()
    recons, idx = [], []
    for i in range(0, len(images), batch):
        enc = model.encode(images[i:i + batch])
        recons.append(model.decode(enc.latent).clamp(-1, 1))
        idx.append(enc.indices.reshape(-1, model.config.groups))
    model.train(was)
    recon, idx = torch.cat(recons), torch.cat(idx)  # (N, 3, H, W), (N*h*w, G)
    mse = ((recon - images) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    k = model.config.codebook_size
    usage, perplexity = [], []
    for g in range(model.config.groups):
        counts = torch.bincount(idx[:, g], minlength=k).float()
        p = counts / counts.sum()
        usage.append(float((counts > 0).float().mean()))
        perplexity.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    metrics = {"psnr": float((10 * torch.log10(1 / mse)).mean()), "usage_per_group": usage,
               "min_usage": min(usage), "perplexity_per_group": perplexity}
    return metrics, recon


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path, n: int = 8) -> None:
    """Originals in the top row, reconstructions below."""
    rows = [originals[:n], recons[:n]]
    s = originals.shape[-1]
    grid = Image.new("RGB", (n * s, 2 * s), (0, 0, 0))
    for r, imgs in enumerate(rows):
        for c, x in enumerate(imgs):
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(arr), (c * s, r * s))
    grid.save(path)


def _lr(step: int, cfg: VQTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def _save_checkpoint(out: Path, model: MultiGroupVQ, opt: torch.optim.Optimizer, step: int, train_cfg: VQTrainConfig,
                     gen: torch.Generator):
    """Atomically replace ``out/checkpoint`` with the state at ``step``, random states included (the
    batch sampler's and torch's, which dead-code replacement draws from): a resumed run takes the
    steps an uninterrupted one would."""
    with atomic_dir(out / "checkpoint", overwrite=True) as tmp:
        model.save(tmp)
        flat = {}
        for i, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                flat[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        save_file(flat, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "train": train_cfg.__dict__,
                                                    "torch_rng": torch.get_rng_state().tolist(),
                                                    "batch_rng": gen.get_state().tolist()}) + "\n")


def _load_checkpoint(ckpt: Path, model: MultiGroupVQ, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
    state = json.loads((ckpt / "state.json").read_text())
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    flat = load_file(ckpt / "optimizer.safetensors")
    sd = opt.state_dict()
    for key, v in flat.items():
        i, k = key.split(".", 1)
        sd["state"].setdefault(int(i), {})[k] = v
    opt.load_state_dict(sd)
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if "batch_rng" in state:
        gen.set_state(torch.tensor(state["batch_rng"], dtype=torch.uint8))
    else:  # a checkpoint from before the sampler's state was kept
        gen.manual_seed(int(state["train"]["seed"]) + int(state["step"]))
    return int(state["step"])


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run killed before its checkpoint at that step)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines(keepends=True) if x.endswith("\n")]
        kept = [x for x in lines if json.loads(x)["step"] <= step]
        if len(kept) != len(lines) or sum(map(len, lines)) != path.stat().st_size:
            atomic_write_bytes(path, "".join(kept).encode())


def train_tokenizer(images_dir: str | Path, out: str | Path, config: VQConfig, train_cfg: VQTrainConfig,
                    progress=None, log=print) -> dict:
    """Train (or resume) a tokenizer into ``out``; returns the last metrics.

    ``progress(step, total, metrics)`` is called every step (a rich bar in the CLI). Finishing
    writes the final tokenizer to ``out/tokenizer`` (config.json + model.safetensors).
    """
    out = Path(out)
    files = list_images(images_dir)
    train_files, held_files = split_held_out(files)
    train_x = load_image_tensors(train_files, config.image_size)
    held_x = load_image_tensors(held_files[:train_cfg.eval_images], config.image_size)

    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    model = MultiGroupVQ(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=0.0)
    step = 0
    gen = torch.Generator().manual_seed(train_cfg.seed)
    if (out / "checkpoint" / "state.json").exists():
        saved = VQConfig.from_dict(json.loads((out / "checkpoint" / "config.json").read_text()))
        if saved != config:
            raise HTCError(f"{out} holds a tokenizer run with another config; use another --out or delete it")
        step = _load_checkpoint(out / "checkpoint", model, opt, gen)
        log(f"resuming from step {step}")
    out.mkdir(parents=True, exist_ok=True)
    _keep_metrics_until(out / "metrics.jsonl", step)
    metrics: dict = {}
    while step < train_cfg.steps:
        for group in opt.param_groups:
            group["lr"] = _lr(step, train_cfg)
        batch = train_x[torch.randint(0, len(train_x), (train_cfg.batch_size,), generator=gen)]
        _, loss, _, parts = model(batch)
        if not torch.isfinite(loss):
            raise HTCError(f"tokenizer loss became {loss.item()} at step {step}; the last checkpoint is intact")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
            metrics, recon = evaluate(model, held_x)
            metrics |= {"step": step, "loss": loss.item(), "reconstruction": parts.reconstruction.item()}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            save_grid(held_x, recon, out / f"recon_{step:06d}.png")
            _save_checkpoint(out, model, opt, step, train_cfg, gen)
            log(f"step {step}: held-out PSNR {metrics['psnr']:.2f} dB, min codebook usage "
                f"{metrics['min_usage']:.2f}, perplexity {min(metrics['perplexity_per_group']):.0f}-"
                f"{max(metrics['perplexity_per_group']):.0f}")
        if progress:
            progress(step, train_cfg.steps, loss.item())
    with atomic_dir(out / "tokenizer", overwrite=True) as tmp:
        model.eval().save(tmp)
        shutil.copy(out / "metrics.jsonl", tmp / "metrics.jsonl")
    return metrics
