"""The ``htc-vlm`` command line: parses options and calls the library, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import HTCError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="htc-vlm: one visual token per image (Hybrid Token Compression for VLMs).")
data_app = typer.Typer(no_args_is_help=True, help="Generate the embedded scene benchmark and its tokenizer.")
app.add_typer(data_app, name="data")
console = Console(stderr=True, soft_wrap=True)  # never break an error line in two


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


@data_app.command("scenes")
def data_scenes(
    out: Annotated[Path, typer.Option(help="Output folder (must be empty or absent).")],
    train: Annotated[int, typer.Option(help="Number of training scenes.")] = 2000,
    test: Annotated[int, typer.Option(help="Number of test scenes (read only by final evaluations).")] = 500,
    val: Annotated[int, typer.Option(help="Number of validation scenes (every recipe choice is made on them).")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same bytes.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (48 for the tiny preset, 336 for CLIP-L/336).")] = 48,
    mme_pairs: Annotated[int, typer.Option(help="MME-style yes/no pairs per training image (distinct sub-tasks, 1-6).")] = 1,
    mc_questions: Annotated[int, typer.Option(help="Multiple-choice questions per training image (distinct kinds, 1-4).")] = 1,
    mc_form: Annotated[str, typer.Option(help="How training and validation MC answers are written: 'letter' (LLaVA's) or "
                                         "'content-letter' (the option's text, then its letter).")] = "letter",
    lookups: Annotated[int, typer.Option(help="Lookup questions per training and validation image: MC options "
                                         "with the answer's text as the question (0-32).")] = 0,
    text_lookups: Annotated[int, typer.Option(help="Text-only lookup questions per training scene, after the "
                                              "captions in train/captions-lookups.json (0-32).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Write the scene benchmark: images, LLaVA training files, per-family test questions, tokenizer."""
    from .data.scenes import write_benchmark
    from .data.tokenizer import save_tokenizer
    from .io import atomic_dir

    with atomic_dir(out, overwrite) as tmp, progress_bar() as bar:
        task = bar.add_task("rendering scenes", total=train + val + test)
        meta = write_benchmark(tmp, train, test, seed, size, progress=lambda: bar.advance(task), n_val=val,
                               mme_pairs=mme_pairs, mc_questions=mc_questions, mc_form=mc_form, lookups=lookups,
                               text_lookups=text_lookups)
        save_tokenizer(tmp / "tokenizer")
    console.print(f"wrote {train} train, {val} val and {test} test scenes to {out}: " +
                  ", ".join(f"{k} {v}" for k, v in meta["questions"].items()))


@data_app.command("tokenizer")
def data_tokenizer(
    out: Annotated[Path, typer.Option(help="Output folder for the tokenizer.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Write the embedded default's word-level tokenizer (transformers format, no network)."""
    from .data.tokenizer import save_tokenizer
    from .io import atomic_dir

    with atomic_dir(out, overwrite) as tmp:
        tok = save_tokenizer(tmp)
    console.print(f"wrote a {len(tok)}-token tokenizer to {out}")


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    images: Annotated[Path, typer.Option(help="Folder of training images (test_* files are held out).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint, metrics.jsonl, recon grids, tokenizer/.")],
    preset: Annotated[str, typer.Option(help="Tokenizer preset: tiny or mgvq-f16c32-g8.")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the preset's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate and checkpoint every N steps.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the multi-group VQ tokenizer (MGVQ-style); resumes from OUT's checkpoint."""
    from .vq.model import vq_preset
    from .vq.train import VQTrainConfig, train_tokenizer

    cfg = vq_preset(preset)
    base = VQTrainConfig(seed=seed)
    over = {k: v for k, v in dict(steps=steps, batch_size=batch_size, eval_every=eval_every).items() if v is not None}
    if any(v <= 0 for v in over.values()):
        raise HTCError(f"--steps, --batch-size and --eval-every must be positive, got {over}")
    tcfg = VQTrainConfig(**(base.__dict__ | over))
    with progress_bar() as bar:
        task = bar.add_task("training tokenizer", total=tcfg.steps)
        metrics = train_tokenizer(images, out, cfg, tcfg, progress=lambda s, n, loss: bar.update(task, completed=s),
                                  log=lambda m: bar.console.print(m, highlight=False))
    console.print(f"tokenizer: {out / 'tokenizer'}; held-out PSNR {metrics.get('psnr', float('nan')):.2f} dB, "
                  f"min codebook usage {metrics.get('min_usage', float('nan')):.2f}")


@app.command("encode-discrete")
def encode_discrete(
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer folder (config.json + model.safetensors) or its run folder.")],
    images: Annotated[Path, typer.Option(help="Image folder (searched recursively; ids are relative paths).")],
    out: Annotated[Path, typer.Option(help="Feature store file (.safetensors).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard file.")] = 50_000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    image_aspect_ratio: Annotated[str, typer.Option(help="exact (refuse other sizes), resize, crop, or pad "
                                                         "(LLaVA-1.5: the model's preprocessor_config.json says).")] = "exact",
) -> None:
    """Write q (the flattened quantized latent) of every image to a safetensors feature store; a run
    stopped part way resumes from the batches it finished."""
    import hashlib
    import shutil

    from .data.images import list_images
    from .vq.model import MultiGroupVQ
    from .vq.store import encode_folder, write_store

    if out.exists() and not overwrite:
        raise HTCError(f"{out} exists; pass --overwrite to replace it")
    folder = tokenizer / "tokenizer" if (tokenizer / "tokenizer" / "config.json").exists() else tokenizer
    model = MultiGroupVQ.load(folder)
    n = len(list_images(images, recursive=True))
    work = out.with_name(f".{out.name}.partial")  # finished batches: a run started again resumes from them
    key = hashlib.sha256(b"".join((folder / f).read_bytes() for f in ("config.json", "model.safetensors"))).hexdigest()
    with progress_bar() as bar:
        task = bar.add_task("encoding", total=n)
        feats, failed = encode_folder(model, images, batch_size, progress=lambda k: bar.advance(task, k),
                                      work=work, tokenizer_key=key, aspect=image_aspect_ratio)
    for msg in failed:
        console.print(f"[red]failed:[/red] {msg}", highlight=False)
    if not feats:
        raise HTCError(f"no image of {images} could be encoded")
    cfg = model.config
    write_store(feats, out, shard_size, metadata={"channels": cfg.latent_channels, "grid": cfg.grid,
                                                   "q_dim": cfg.q_dim, "tokenizer": str(folder)})
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"wrote q ({cfg.q_dim} values) of {len(feats)} images to {out}"
                  + (f"; {len(failed)} failed" if failed else ""))
    if failed:
        raise typer.Exit(1)  # the rest is written; exit 1 says that some images were not


@app.command("import-mgvq")
def import_mgvq(
    ckpt: Annotated[Path, typer.Option(help="MGVQ's tokenizer checkpoint (e.g. mgvq_f16c32_g8.pt).")],
    codes: Annotated[Path, typer.Option(help="safetensors file {image_id: codes (h*w, G)} from MGVQ's encode().")],
    out: Annotated[Path, typer.Option(help="Feature store file (.safetensors).")],
    groups: Annotated[int, typer.Option(min=1, help="Codebook groups of the checkpoint (g8: 8).")] = 8,
    grid: Annotated[int, typer.Option(min=1, help="Latent grid side (336 px / 16 = 21).")] = 21,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
) -> None:
    """Turn codes computed with MGVQ's own encoder into our feature store, with the checkpoint's codebooks."""
    from .vq.mgvq import import_codes

    if out.exists() and not overwrite:
        raise HTCError(f"{out} exists; pass --overwrite to replace it")
    n = import_codes(ckpt, codes, out, groups, grid)
    console.print(f"wrote q of {n} images to {out}", highlight=False)


@app.command("convert-llava")
def convert_llava_cmd(
    src: Annotated[Path, typer.Argument(help="An original LLaVA checkpoint folder (mm_projector.*, e.g. llava-v1.5-7b).")],
    out: Annotated[Path, typer.Option(help="Folder for the llava-hf layout (read by train model.llava=OUT).")],
    vision_tower: Annotated[Path | None, typer.Option(help="The CLIP tower's folder (openai/clip-vit-large-patch14-336): "
                                                        "released LLaVA-1.5 checkpoints leave it out.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
) -> None:
    """Convert an original LLaVA-1.5 checkpoint to the llava-hf layout, with <image> / <voco> in its
    tokenizer and its image processing (pad to square) in preprocessor_config.json."""
    from .convert import convert_llava

    console.print(f"wrote {convert_llava(src, out, vision_tower, overwrite)}", highlight=False)


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Annotated[str, typer.Option(help="A shipped preset (tiny, llava-1.5-7b) or a YAML file.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. stage=compress optim.max_steps=10")] = None,
    method: Annotated[str | None, typer.Option(help="A trained method (`htc-vlm methods` lists them): "
                                                    "the compress stage with its options.")] = None,
    budget: Annotated[int, typer.Option(min=1, help="Visual tokens the method keeps (with --method).")] = 1,
) -> None:
    """Train one stage (vision, align, instruct, compress) on the HF Trainer; resumes from checkpoints."""
    from .methods import get_method
    from .training.config import load_config
    from .training.run import train as run_stage

    extra = []
    if method is not None:
        m = get_method(method)
        if m.train_overrides is None:
            raise HTCError(f"method {method!r} is {m.kind}: nothing to train (evaluate it with htc-vlm eval --method {method})")
        extra = ["stage=compress", *m.train_overrides(budget)]
    cfg = load_config(config, extra + list(overrides or []))
    console.print(f"stage {cfg.stage} -> {cfg.output_dir}", highlight=False)
    out = run_stage(cfg)
    console.print(f"model: {out}", highlight=False)


def load_model(model_dir: Path, method: str = "model", budget: int | None = None, options: list[str] | None = None):
    """A trained HTC model (or a method's wrapper of it) and its tokenizer."""
    from transformers import AutoTokenizer

    from .methods import get_method, load_for_method, parse_options

    opts = parse_options(get_method(method), options) if method != "model" else {}
    model = load_for_method(model_dir, method, budget, opts)
    try:
        return model, AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise HTCError(f"no readable tokenizer in {model_dir} ({type(e).__name__}: {str(e).splitlines()[0]})") from e


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option(help="Model folder (a training stage's model/).")],
    benchmark: Annotated[str, typer.Option(help="vqav2, vqav2_normalized, gqa, textvqa, pope, mme, mmbench, seed, scienceqa_img, scenes_open.")],
    questions: Annotated[Path, typer.Option(help="LLaVA-style question JSONL.")],
    images: Annotated[Path, typer.Option(help="Image folder the questions' image fields are relative to.")],
    out: Annotated[Path, typer.Option(help="Output folder: predictions.jsonl and metrics.json.")],
    method: Annotated[str, typer.Option(help="A method name (htc-vlm methods), or 'model' to run the folder as trained.")] = "model",
    budget: Annotated[int | None, typer.Option(min=1, help="Visual tokens kept (Table 2 budgets; training-free methods).")] = None,
    option: Annotated[list[str] | None, typer.Option(help="A method option key=value, e.g. layer=2 (repeatable).")] = None,
    features: Annotated[Path | None, typer.Option(help="Discrete feature store (htc / discrete models).")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (plain, vicuna_v1); default: the model's.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per batch.")] = 32,
    likelihood: Annotated[bool, typer.Option(help="Multiple choice by the likelihood of each option letter.")] = False,
    image_norm: Annotated[str | None, typer.Option(help="half ([-1, 1]) or clip; default and only accepted value: "
                                                        "the model's own (config.json image_norm).")] = None,
) -> None:
    """Answer a question file (each image compressed once) and score it; resumes after a crash."""
    from .evaluation.runner import read_questions, run_eval
    from .vq.store import FeatureStore

    m, tok = load_model(model, method, budget, option)
    template = template or m.config.chat_template
    store = FeatureStore(features, expected_dim=m.config.discrete_dim) if features else None
    n = len(read_questions(questions))
    with progress_bar() as bar:
        task = bar.add_task(f"{benchmark} ({method})", total=n)
        result = run_eval(m, tok, benchmark, questions, images, out, method=method, features=store, template=template,
                          batch_size=batch_size, likelihood=likelihood, image_norm=image_norm,
                          progress=lambda k: bar.advance(task, k), model_name=str(model))
    console.print(f"{benchmark}: " + ", ".join(f"{k} {v:.2f}" for k, v in result["scores"].items())
                  + f" -> {out / 'metrics.json'}", highlight=False)


@app.command()
def methods() -> None:
    """List the compression methods: kind, tables, source paper, options."""
    from rich.markup import escape
    from rich.table import Table

    from .methods import METHODS

    t = Table("method", "kind", "tables", "what", "paper", "options")
    for m in METHODS.values():  # escaped: a summary such as "[anchors; patches] -> voco" is text, not markup
        t.add_row(*map(escape, (m.name, m.kind, ",".join(m.tables), m.summary, m.paper, " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in m.options.items()))))
    Console(width=200).print(t)  # stdout: a listing, not a log line


@app.command()
def retention(
    upper: Annotated[list[Path], typer.Option(help="metrics.json of the upper bound (repeat per benchmark).")],
    lower: Annotated[list[Path], typer.Option(help="metrics.json of the lower bound (repeat per benchmark).")],
    runs: Annotated[list[Path], typer.Argument(help="metrics.json files of the methods to compare.")],
    out: Annotated[Path | None, typer.Option(help="Write the table as JSON here.")] = None,
) -> None:
    """Print the paper's Table 1 layout: score and retention (R - L) / (U - L) per benchmark."""
    import json

    from .evaluation.retention import load_scores, markdown, table
    from .io import atomic_write_bytes

    def merged(paths):
        scores = {}
        for p in paths:
            scores |= load_scores(p)[1]
        return scores

    methods: dict[str, dict[str, float]] = {}
    for p in runs:
        name, scores = load_scores(p)
        methods.setdefault(name, {}).update(scores)
    t = table(merged(upper), merged(lower), methods)
    typer.echo(markdown(t))
    if out:
        atomic_write_bytes(out, (json.dumps(t, indent=1) + "\n").encode())


def _image_encoder(model, features: Path | None, vq: Path | None):
    from .inference import ImageEncoder
    from .vq.model import MultiGroupVQ
    from .vq.store import FeatureStore

    store = FeatureStore(features, expected_dim=model.config.discrete_dim) if features else None
    tok = None
    if vq is not None:
        tok = MultiGroupVQ.load(vq / "tokenizer" if (vq / "tokenizer" / "config.json").exists() else vq)
        if tok.config.q_dim != model.config.discrete_dim:
            raise HTCError(f"the VQ tokenizer {vq} gives q of length {tok.config.q_dim}; the model expects "
                           f"{model.config.discrete_dim}")
    return ImageEncoder(model, store, tok)


@app.command()
def compress(
    model: Annotated[Path, typer.Option(help="Model folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files to compress.")],
    out: Annotated[Path, typer.Option(help="Folder for the caches (STEM-IMAGEHASH-MODEL.safetensors).")],
    features: Annotated[Path | None, typer.Option(help="Discrete feature store (htc / discrete models).")] = None,
    vq: Annotated[Path | None, typer.Option(help="VQ tokenizer folder computing q on the fly instead.")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template whose prefix is cached with the image; default: the model's.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 16,
) -> None:
    """Write one visual cache per image (its voco keys and values); images already compressed are skipped."""
    from .inference import compress_images

    m, tok = load_model(model)
    template = template or m.config.chat_template
    enc = _image_encoder(m, features, vq)
    with progress_bar() as bar:
        task = bar.add_task("compressing", total=len(images))
        written, failed = compress_images(m, enc, images, out, template, tok, batch_size,
                                          progress=lambda k: bar.advance(task, k))
    for msg in failed:
        console.print(f"[red]failed:[/red] {msg}", highlight=False)
    if len(written) <= 10:
        for img, target in written.items():
            console.print(f"{img} -> {target}", highlight=False)
    console.print(f"wrote {len(written)} caches to {out}, skipped {len(images) - len(written) - len(failed)} "
                  f"already there, {len(failed)} failed", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def ask(
    model: Annotated[Path, typer.Option(help="Model folder.")],
    questions: Annotated[list[str], typer.Argument(help="One or more questions.")],
    image: Annotated[Path | None, typer.Option(help="An image: compressed once, then every question answered.")] = None,
    cache: Annotated[Path | None, typer.Option(help="A visual cache written by `htc-vlm compress`.")] = None,
    features: Annotated[Path | None, typer.Option(help="Discrete feature store (htc / discrete models).")] = None,
    vq: Annotated[Path | None, typer.Option(help="VQ tokenizer folder computing q on the fly.")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template; default: the model's.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 32,
) -> None:
    """Answer questions about one image from its visual cache (made on the spot from --image)."""
    from .cache import VisualCache
    from .data.llava import PromptBuilder, get_template
    from .inference import ask as ask_cache

    if (image is None) == (cache is None):
        raise HTCError("give exactly one of --image or --cache")
    if empty := [i + 1 for i, q in enumerate(questions) if not q.strip()]:
        raise HTCError(f"question {empty[0]} is empty")
    m, tok = load_model(model)
    template = template or m.config.chat_template
    if cache is not None:
        vc = VisualCache.load(cache, expected_fingerprint=m.fingerprint())
    else:
        pix, q = _image_encoder(m, features, vq).encode([image])
        vc = m.compress(pix, q, prefix_ids=PromptBuilder(tok, get_template(template), m.config).prefix_ids())
    for question, answer in zip(questions, ask_cache(m, tok, vc, questions, template, max_new_tokens)):
        typer.echo(f"Q: {question}\nA: {answer}")


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="A trained model folder; methods that choose tokens per question are refused.")],
    vq: Annotated[Path | None, typer.Option(help="VQ tokenizer folder computing q of uploaded images (htc / discrete).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    cache_dir: Annotated[str | None, typer.Option(help="Caches on disk: a folder or an fsspec URL such as s3://bucket/caches "
                                                      "(shared by replicas, kept across restarts).")] = None,
    cache_memory: Annotated[str, typer.Option(help="Memory for caches, e.g. 2GB (least recently used evicted).")] = "2GB",
    template: Annotated[str | None, typer.Option(help="Chat template (plain, vicuna_v1); default: the model's.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Questions answered in one model call.")] = 32,
    queue_size: Annotated[int, typer.Option(min=1, help="Questions waiting before requests get 429.")] = 256,
    batch_gap_ms: Annotated[float, typer.Option(min=0, help="A batch takes more questions while each comes within this "
                                                "of the last (clients asking again after their answers).")] = 30.0,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="The most a batch waits for more questions after its first.")] = 250.0,
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="Largest image upload, in MB.")] = 20.0,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest image, in pixels.")] = 4096 * 4096,
    max_tokens: Annotated[int, typer.Option(min=1, help="The most tokens a request may ask for.")] = 256,
    name: Annotated[str | None, typer.Option(help="Model name in the API (default: the run folder's name).")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible API: each image compressed once, questions batched."""
    try:
        import uvicorn

        from .serving.app import create_app
    except ImportError as e:
        raise HTCError(f"serving needs the 'serve' extra: pip install -e \".[serve]\" ({e})") from None
    from .serving.engine import Engine, Limits
    from .serving.store import CacheStore, parse_bytes
    from .vq.model import MultiGroupVQ

    m, tok = load_model(model)
    template = template or m.config.chat_template
    tok_vq = MultiGroupVQ.load(vq / "tokenizer" if (vq / "tokenizer" / "config.json").exists() else vq) if vq else None
    store = CacheStore(parse_bytes(cache_memory), cache_dir)
    limits = Limits(max_image_bytes=int(max_image_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                    max_tokens=max_tokens, max_batch=max_batch, queue_size=queue_size,
                    batch_gap_s=batch_gap_ms / 1000, batch_wait_s=batch_wait_ms / 1000)
    engine = Engine(m, tok, store, template, tok_vq, limits)
    console.print(f"serving {model} on http://{host}:{port}/v1 (caches: {cache_memory} in memory"
                  + (f", {cache_dir} on disk)" if cache_dir else ")"), highlight=False)
    name = name or (model.resolve().parent.name if model.name == "model" else model.resolve().name)
    uvicorn.run(create_app(engine, name), host=host, port=port, log_level="warning")


@app.command()
def bench(
    model: Annotated[Path | None, typer.Option(help="A compressing model folder to measure.")] = None,
    preset: Annotated[str, typer.Option(help="Without --model: a random-weight preset, tiny or mid.")] = "mid",
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench.png.")] = Path("runs/bench"),
    question_tokens: Annotated[int, typer.Option(min=1, help="Question length in tokens.")] = 20,
    answer_tokens: Annotated[int, typer.Option(min=1, help="Tokens decoded per answer.")] = 16,
    reps: Annotated[int, typer.Option(min=1, help="Timed repetitions (the median is kept).")] = 3,
) -> None:
    """Uncompressed vs compressed, side by side on the same weights: KV bytes, FLOPs, times."""
    import torch
    from rich.table import Table

    from .efficiency import bench_config, run_bench, table_rows, write_outputs
    from .modeling import HTCForConditionalGeneration

    if model is not None:
        m, _ = load_model(model)
    else:
        torch.manual_seed(0)
        m = HTCForConditionalGeneration(bench_config(preset))
    console.print(f"measuring ({torch.get_num_threads()} threads) ...")
    result = run_bench(m, question_tokens, answer_tokens, reps)
    t = Table("", "uncompressed", "compressed", "ratio", title=f"htc-vlm bench: {model or preset}")
    for row in table_rows(result):
        t.add_row(*row)
    Console().print(t)
    for p in write_outputs(result, out):
        console.print(f"wrote {p}", highlight=False)


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Run folder; finished stages are skipped when run again.")] = Path("runs/tiny"),
    preset: Annotated[str, typer.Option(help="Preset of the run.")] = "tiny",
    quick: Annotated[bool, typer.Option(help="Fewer scenes and steps (the CI smoke run).")] = False,
    only: Annotated[list[str] | None, typer.Option(help="Run only these stages (repeatable).")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Train Table 1 with seeds 0..N-1 (default 3); may grow on a finished run.")] = None,
    jobs: Annotated[int | None, typer.Option(help="Compression runs and evaluations trained side by side, each on "
                                                   "cores/N threads (default: one per core, at most 8).")] = None,
    base_per_seed: Annotated[bool | None, typer.Option(
        "--base-per-seed/--one-base", help="Table 1's seed s > 0 also trains its own base model (align + instruct "
        "with seed s) and compresses from it, so the intervals cover the base's variation (default: the preset's; tiny: a base per seed).")] = None,
    mc_form: Annotated[str | None, typer.Option(help="How the training data write MC answers: 'letter' (LLaVA's) "
                                                     "or 'content-letter' (the option's text, then its letter; tiny's default).")] = None,
    lookups: Annotated[int | None, typer.Option(help="Lookup questions per training image (MC options with the "
                                                     "answer's text as the question; default: the preset's; tiny: 8).")] = None,
    instruct_epochs: Annotated[float | None, typer.Option(help="Epochs of every base's instruct stage (default: the "
                                                               "preset's; tiny: 12).")] = None,
    letter_epochs: Annotated[float | None, typer.Option(help="Epochs of a first instruct stage of every base on letter "
        "MC answers without lookups, before the instruct stage on the run's own (needs --mc-form content-letter or "
        "--lookups; default: the preset's; tiny: 6; 0: one instruct stage).")] = None,
    replay_verification: Annotated[bool | None, typer.Option(
        "--replay-verification/--no-replay-verification", help="With --letter-epochs: the second instruct stage "
        "also trains on the first one's POPE and MME questions again (default: the preset's; tiny: on).")] = None,
    mme_pairs: Annotated[int | None, typer.Option(help="MME yes/no pairs per training image, of distinct sub-tasks "
                                                       "(1-6; default: the preset's; tiny: 3).")] = None,
    align_epochs: Annotated[float | None, typer.Option(help="Epochs of every base's align stage (default: the "
                                                            "preset's; tiny: 24).")] = None,
    text_lookups: Annotated[int | None, typer.Option(help="Text-only lookup questions per training image that every "
        "base's align stage also trains on, so its language model learns to find an option's letter from its text "
        "(0-32; default: the preset's, 0).")] = None,
    compress_steps: Annotated[int | None, typer.Option(help="Steps of every compression run (Tables 1, 2, 4; "
                                                            "default: the preset's; tiny: 3,000).")] = None,
    keep_best: Annotated[bool | None, typer.Option(
        "--keep-best/--keep-last", help="Each compression run keeps the checkpoint of its lowest validation loss "
        "instead of its last step's (default: the preset's; tiny: the last).")] = None,
) -> None:
    """Run the paper's pipeline on the embedded default, stage by stage, resuming where it stopped."""
    from .reproduce import default_jobs, run

    run(out, preset=preset, quick=quick, only=only, console=console, seeds=seeds,
        jobs=default_jobs() if jobs is None else jobs, base_per_seed=base_per_seed, mc_form=mc_form,
        lookups=lookups, instruct_epochs=instruct_epochs, mme_pairs=mme_pairs, letter_epochs=letter_epochs,
        replay_verification=replay_verification, text_lookups=text_lookups, align_epochs=align_epochs,
        compress_steps=compress_steps, keep_best=keep_best)


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``main(argv)`` is callable from tests. Bad input: one ``error:`` line, exit 2."""
    try:
        app(args=argv, prog_name="htc-vlm")  # standalone: usage errors print and exit 2 themselves
    except HTCError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as e:  # the file system said no (read-only, full, permissions, a path too long)
        where = f" {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else ""
        console.print(f"[red]error:[/red] cannot read or write{where}: {e.strerror or e}", highlight=False,
                      soft_wrap=True)
        return 2
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C into exit code 130 without a word
            return _interrupted()
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _interrupted() -> int:
    console.print("[yellow]interrupted[/yellow]: what was finished is kept; run the same command again to resume",
                  highlight=False)
    return 130


if __name__ == "__main__":
    sys.exit(main())
