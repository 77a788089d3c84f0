"""The staged pipeline behind ``htc-vlm reproduce``.

Each stage writes into its own folder of the run and is recorded in ``run.json`` when it finishes,
so running the command again skips finished stages and resumes at the one in progress. A run
folder belongs to one preset and one set of options: another preset is refused with a message.

Stages are registered in order in :data:`STAGES`; later issues (training, evaluation, analysis)
add theirs. The report lists each finished stage with its outputs and the command behind them.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import HTCError
from .io import atomic_dir, atomic_write_bytes


@dataclass(frozen=True)
class RunPreset:
    name: str
    image_size: int
    train_scenes: int
    test_scenes: int
    vision_epochs: float = 10
    vq_steps: int = 800
    align_epochs: float = 2
    instruct_epochs: float = 2
    seed: int = 0


PRESETS = {
    "tiny": RunPreset("tiny", image_size=64, train_scenes=2000, test_scenes=500),
    "tiny-quick": RunPreset("tiny-quick", image_size=64, train_scenes=300, test_scenes=60, vision_epochs=2,
                            vq_steps=40, align_epochs=1, instruct_epochs=1),
}


def get_preset(name: str, quick: bool) -> RunPreset:
    key = f"{name}-quick" if quick else name
    if key not in PRESETS:
        raise HTCError(f"unknown preset {name!r}{' with --quick' if quick else ''}; known: "
                       + ", ".join(sorted(p for p in PRESETS if not p.endswith("-quick"))))
    return PRESETS[key]


@dataclass
class Stage:
    name: str
    run: Callable[[Path, RunPreset], dict]  # (run folder, preset) -> summary for the report
    help: str


def _stage_scenes(root: Path, preset: RunPreset) -> dict:
    from .data.scenes import write_benchmark
    from .data.tokenizer import save_tokenizer

    with atomic_dir(root / "scenes", overwrite=True) as tmp:
        meta = write_benchmark(tmp, preset.train_scenes, preset.test_scenes, preset.seed, preset.image_size)
        save_tokenizer(tmp / "tokenizer")
    cmd = (f"htc-vlm data scenes --out {root / 'scenes'} --train {preset.train_scenes} "
           f"--test {preset.test_scenes} --seed {preset.seed} --size {preset.image_size}")
    return {"outputs": str(root / "scenes"), "command": cmd, "questions": meta["questions"]}


def _train_stage(root: Path, preset: RunPreset, stage: str, out: str, epochs: float, *extra: str) -> dict:
    from .training.config import load_config
    from .training.run import train

    sc = root / "scenes"
    overrides = [f"stage={stage}", f"output_dir={root / out}", f"data.images={sc / 'images'}",
                 f"data.tokenizer={sc / 'tokenizer'}", f"data.features={root / 'features.safetensors'}",
                 f"optim.num_train_epochs={epochs}", f"optim.seed={preset.seed}", *extra]
    model = train(load_config("tiny", overrides))
    return {"outputs": str(model), "command": "htc-vlm train --config tiny " + " ".join(overrides)}


def _stage_vision(root: Path, preset: RunPreset) -> dict:
    return _train_stage(root, preset, "vision", "vision", preset.vision_epochs,
                        f"data.scenes={root / 'scenes' / 'train' / 'scenes.jsonl'}")


def _stage_tokenizer(root: Path, preset: RunPreset) -> dict:
    from .vq.model import vq_preset
    from .vq.train import VQTrainConfig, train_tokenizer

    m = train_tokenizer(root / "scenes" / "images", root / "vq", vq_preset("tiny"),
                        VQTrainConfig(steps=preset.vq_steps, eval_every=max(1, preset.vq_steps // 4), seed=preset.seed),
                        log=lambda msg: None)
    return {"outputs": str(root / "vq" / "tokenizer"), "psnr_db": round(m["psnr"], 2),
            "min_codebook_usage": round(m["min_usage"], 3),
            "command": f"htc-vlm train-tokenizer --images {root / 'scenes' / 'images'} --out {root / 'vq'} "
                       f"--steps {preset.vq_steps} --seed {preset.seed}"}


def _stage_features(root: Path, preset: RunPreset) -> dict:
    from .vq.model import MultiGroupVQ
    from .vq.store import encode_folder, write_store

    tok = MultiGroupVQ.load(root / "vq" / "tokenizer")
    feats, failed = encode_folder(tok, root / "scenes" / "images")
    if failed:
        raise HTCError(f"{len(failed)} images could not be encoded: {failed[0]}")
    write_store(feats, root / "features.safetensors")
    return {"outputs": str(root / "features.safetensors"), "images": len(feats),
            "command": f"htc-vlm encode-discrete --tokenizer {root / 'vq'} --images {root / 'scenes' / 'images'} "
                       f"--out {root / 'features.safetensors'}"}


def _stage_align(root: Path, preset: RunPreset) -> dict:
    return _train_stage(root, preset, "align", "align", preset.align_epochs,
                        f"model.vision_tower={root / 'vision' / 'model'}",
                        f"data.conversations={root / 'scenes' / 'train' / 'captions.json'}")


def _stage_instruct(root: Path, preset: RunPreset) -> dict:
    return _train_stage(root, preset, "instruct", "instruct", preset.instruct_epochs,
                        f"model.init={root / 'align' / 'model'}",
                        f"data.conversations={root / 'scenes' / 'train' / 'conversations.json'}")


FAMILY_BENCHMARKS = {"open": "scenes_open", "pope_random": "pope", "pope_popular": "pope",
                     "pope_adversarial": "pope", "mme": "mme", "mc": "mmbench"}


def _stage_eval_upper(root: Path, preset: RunPreset) -> dict:
    from transformers import AutoTokenizer

    from .data.scenes import read_jsonl
    from .evaluation.runner import run_eval
    from .evaluation.scorers import vqa
    from .methods import load_for_method

    model_dir = root / "instruct" / "model"
    model, tok = load_for_method(model_dir, "model"), AutoTokenizer.from_pretrained(model_dir)
    scores, by_tag = {}, {}
    for family, bench in FAMILY_BENCHMARKS.items():
        qfile = root / "scenes" / "test" / f"{family}.jsonl"
        r = run_eval(model, tok, bench, qfile, root / "scenes" / "images", root / "eval" / "upper" / family,
                     method="upper", model_name=str(model_dir))
        scores[family] = round(r["scores"][bench], 2)
        if family == "open":
            preds = {json.loads(x)["question_id"]: json.loads(x)["prediction"]
                     for x in (root / "eval" / "upper" / family / "predictions.jsonl").read_text().splitlines()}
            for tag in ("semantic", "detail"):
                rows = [q for q in read_jsonl(qfile) if q["tag"] == tag]
                by_tag[tag] = round(100 * sum(vqa.accuracy(preds[q["question_id"]], [q["answer"]]) for q in rows)
                                    / len(rows), 2)
    return {"outputs": str(root / "eval" / "upper"), "scores": scores, "open_by_tag": by_tag,
            "command": f"htc-vlm eval --model {model_dir} --benchmark scenes_open --questions "
                       f"{root / 'scenes/test/open.jsonl'} --images {root / 'scenes/images'} --out {root / 'eval/upper/open'}"}


STAGES: list[Stage] = [
    Stage("scenes", _stage_scenes, "generate the scene benchmark and the embedded tokenizer"),
    Stage("vision", _stage_vision, "pre-train the tiny vision tower (dense scene attributes)"),
    Stage("tokenizer", _stage_tokenizer, "train the multi-group VQ tokenizer"),
    Stage("features", _stage_features, "store the discrete latents q of every image"),
    Stage("align", _stage_align, "align: projector (and the from-scratch LM) on captions"),
    Stage("instruct", _stage_instruct, "instruct: the uncompressed upper bound"),
    Stage("eval_upper", _stage_eval_upper, "evaluate the upper bound on every question family"),
]


def run(out: Path, preset: str = "tiny", quick: bool = False, only: list[str] | None = None, console=None) -> dict:
    """Run (or resume) every stage of ``preset`` into ``out``; return the run record."""
    p = get_preset(preset, quick)
    names = [s.name for s in STAGES]
    for n in only or []:
        if n not in names:
            raise HTCError(f"unknown stage {n!r}; stages: {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "run.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"preset": asdict(p), "stages": {}}
    if record["preset"] != asdict(p):
        raise HTCError(f"{out} holds a run of preset {record['preset']['name']!r} with other settings; "
                       f"resume it with the same options, or start fresh with another --out or after deleting {out}")

    def save():
        atomic_write_bytes(record_path, (json.dumps(record, indent=1) + "\n").encode())

    for i, stage in enumerate(STAGES, 1):
        state = record["stages"].get(stage.name, {})
        if (only and stage.name not in only) or state.get("status") == "done":
            _say(console, f"[{i}/{len(STAGES)}] {stage.name}: {'skipped' if only and stage.name not in only else 'done already'}")
            continue
        _say(console, f"[{i}/{len(STAGES)}] {stage.name}: {stage.help}")
        t0 = time.perf_counter()
        try:
            summary = stage.run(out, p)
        except Exception as e:
            record["stages"][stage.name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc()}
            save()
            _write_report(out, record)
            raise
        record["stages"][stage.name] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2), **summary}
        save()
    _write_report(out, record)
    _say(console, f"report: {out / 'report.md'}")
    return record


def _write_report(out: Path, record: dict) -> None:
    lines = [f"# htc-vlm reproduce: preset {record['preset']['name']}", "",
             "| stage | status | seconds | outputs | command |", "|---|---|---|---|---|"]
    for name, s in record["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {s.get('outputs', '')} | "
                     f"`{s.get('command', '')}` |" if s["status"] == "done" else f"| {name} | failed: {s['error']} | | | |")
    ev = record["stages"].get("eval_upper", {})
    if ev.get("status") == "done":
        lines += ["", "## Upper bound (uncompressed) on the scene benchmark", "",
                  "| family | score |", "|---|---|"]
        lines += [f"| {fam} ({FAMILY_BENCHMARKS[fam]} metric) | {v} |" for fam, v in ev["scores"].items()]
        lines += [f"| open, {tag} questions | {v} |" for tag, v in ev["open_by_tag"].items()]
    tok = record["stages"].get("tokenizer", {})
    if tok.get("status") == "done":
        lines += ["", f"Tokenizer: held-out PSNR {tok['psnr_db']} dB, min codebook usage {tok['min_codebook_usage']}."]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(out / "results.json", (json.dumps(record, indent=1) + "\n").encode())


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False)
