"""One training stage on the HF ``Trainer`` (so torchrun, accelerate and DeepSpeed work as usual).

Stages (``TrainConfig.stage``):

- ``vision``: pre-train the tiny tower by scene attribute prediction (embedded default only).
- ``align``: the projector only, on captions (LLaVA stage 1), all image tokens visible.
- ``instruct``: projector + language model on conversations, all image tokens visible (upper bound).
- ``compress``: from ``instruct`` with a compression option: voco, anchor projector, projector and
  language model train under the disentanglement mask (Eq. 9); the vision tower stays frozen.

Checkpoints are the Trainer's (safetensors weights, ``weights_only`` loads); a checkpoint counts
only once its ``COMPLETE`` marker is written after the save, so a crash mid-save is never resumed
from. The final model goes to ``output_dir/model`` in one rename, with the tokenizer and the
training config beside it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..data.images import norm_stats
from ..data.llava import Collator, LlavaDataset
from ..data.processor import ImageProcessing
from ..data.tokenizer import add_htc_tokens
from ..errors import HTCError
from ..io import atomic_dir
from ..modeling import HTCForConditionalGeneration
from ..presets import build_config
from ..progress import ProgressCallback
from .config import TrainConfig, deepspeed_path
from .plateau import FLAT_TOLERANCE, is_flat, relative_gain, val_curve

MARKER = "COMPLETE"


class CommitMarker(TrainerCallback):
    """Marks a checkpoint folder complete after the Trainer has written all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / MARKER).write_text(f"{state.global_step}\n")


class StopWhenFlat(TrainerCallback):
    """Ends training at the first evaluation where :func:`is_flat` holds (and ``min_steps`` are done)."""

    def __init__(self, tolerance: float, window: float, min_steps: int = 0):
        self.tolerance, self.window, self.min_steps = tolerance, window, min_steps

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        curve = val_curve(state.log_history)
        if state.global_step >= self.min_steps and is_flat(curve, self.tolerance, self.window):
            control.should_training_stop = True
        return control


class HTCTrainer(Trainer):
    """Stops with a clear error the moment the loss is not finite (the last checkpoint stays intact)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        if not torch.isfinite(loss.detach()).all():
            last = last_checkpoint(self.args.output_dir)
            raise HTCError(f"the loss became {loss.detach().float().item()} at step {self.state.global_step + 1}; "
                           f"training stopped, last good checkpoint: {last or 'none yet'}")
        return out

    def _get_train_sampler(self, train_dataset=None):
        """With ``group_by_length``, lengths come from the dataset's ``lengths()`` (word counts, as LLaVA's
        trainer does) instead of the Trainer's default, which would load every sample (and image) once."""
        data = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(data, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=data.lengths())
        return super()._get_train_sampler(train_dataset)


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint; incomplete ones (no marker) are ignored."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / MARKER).exists() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return str(max(done, key=checkpoint_step)) if done else None


def checkpoint_step(folder: str | Path) -> int:
    """N of a Trainer checkpoint folder ``checkpoint-N``."""
    return int(Path(folder).name.rsplit("-", 1)[1])


def training_arguments(cfg: TrainConfig, **extra) -> TrainingArguments:
    o = cfg.optim
    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=cfg.output_dir, learning_rate=o.learning_rate, num_train_epochs=o.num_train_epochs,
        max_steps=o.max_steps, per_device_train_batch_size=o.per_device_train_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps, warmup_steps=o.warmup_ratio,
        lr_scheduler_type=o.lr_scheduler_type,
        train_sampling_strategy="group_by_length" if o.group_by_length else "random", weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
        bf16=o.bf16, deepspeed=deepspeed_path(o.deepspeed),
        logging_steps=o.logging_steps, save_strategy="steps",
        save_steps=o.eval_steps if o.keep_best else o.save_steps,
        save_total_limit=o.save_total_limit, seed=o.seed, data_seed=o.seed,
        dataloader_num_workers=o.dataloader_num_workers, dataloader_pin_memory=not cpu, use_cpu=cpu,
        remove_unused_columns=False, report_to=[], ddp_find_unused_parameters=False,
        disable_tqdm=not _rank0(), **({"activation_checkpointing": True} if o.gradient_checkpointing else {}),
        **({"eval_strategy": "steps", "eval_steps": o.eval_steps, "prediction_loss_only": True,
            "per_device_eval_batch_size": o.per_device_train_batch_size} if o.eval_steps else {}),
        **({"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False}
           if o.keep_best else {}), **extra,
    )


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------- models per stage


def load_tokenizer(cfg: TrainConfig):
    """``data.tokenizer``, else the tokenizer saved with ``model.llava`` (an llava-hf folder), with
    ``<image>`` / ``<voco>`` added where missing (the model's embeddings grow to match)."""
    folder = cfg.data.tokenizer or cfg.model.llava
    if not folder or not Path(folder).is_dir():
        raise HTCError(f"data.tokenizer {cfg.data.tokenizer!r} is not a tokenizer folder"
                       + ("" if cfg.data.tokenizer else " (set it, or model.llava to a folder with a tokenizer)"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise HTCError(f"no readable tokenizer in {folder} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    added = add_htc_tokens(tokenizer)
    if added and _rank0():
        print(f"tokenizer {folder}: added {', '.join(added)} (ids {tokenizer.convert_tokens_to_ids(added)})")
    return tokenizer


def _load_htc(cfg: TrainConfig, tokenizer) -> HTCForConditionalGeneration:
    m = cfg.model
    attn = {"attn_implementation": m.attn_implementation}
    if m.init:
        if not (Path(m.init) / "config.json").exists():
            raise HTCError(f"model.init {m.init} is not an HTC checkpoint folder (no config.json); "
                           f"train the previous stage first")
        overrides = m.overrides()
        num_voco = overrides.pop("num_voco", None)
        model = HTCForConditionalGeneration.from_pretrained(m.init, **overrides, **attn)
        if num_voco is not None:  # e.g. Table 2 budgets from the upper bound's one voco embedding
            model.resize_voco(num_voco)
        return model
    if m.llava:
        return HTCForConditionalGeneration.from_llava(m.llava, tokenizer=tokenizer, **m.overrides())
    # From parts: the architecture's config, a pretrained tower, optionally a pretrained LM.
    if not m.vision_tower:
        raise HTCError("a model built from parts needs model.vision_tower (a pretrained tower folder): "
                       "a language model on a random tower learns to ignore the image")
    tower = AutoModel.from_pretrained(m.vision_tower)
    config = build_config(m.arch, tokenizer, vision_config=tower.config, **m.overrides())
    model = HTCForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    own = ImageProcessing.load(m.vision_tower, config.vision_config.image_size)  # e.g. CLIP's processor
    if own is not None:
        model.image_processing = own
    if m.language_model:
        lm = AutoModelForCausalLM.from_pretrained(m.language_model)
        lm.resize_token_embeddings(len(tokenizer))
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.set_attn_implementation(m.attn_implementation)
    return model


def image_processing(cfg: TrainConfig, model: HTCForConditionalGeneration) -> ImageProcessing:
    """The stage's image processing: the starting checkpoint's, with what ``data`` sets replacing it."""
    d, own = cfg.data, model.image_processing
    aspect = d.image_aspect_ratio or ("resize" if d.resize else None)
    if d.image_norm is None and aspect is None:
        return own
    mean, std = norm_stats(d.image_norm) if d.image_norm else (own.mean, own.std)
    new = ImageProcessing(own.size, aspect or own.aspect, mean, std)
    if new != own and _rank0() and (cfg.model.init or cfg.model.llava):
        print(f"image processing: {own.aspect} / {own.norm or own.mean} of the checkpoint replaced by "
              f"{new.aspect} / {new.norm or new.mean} (data.image_aspect_ratio / data.image_norm)")
    return new


def freeze_for_stage(model: HTCForConditionalGeneration, cfg: TrainConfig) -> list[str]:
    """Train the stage's parts only; parts the compression does not use stay frozen (DDP needs it)."""
    prefixes = cfg.trainable_prefixes()
    c = model.config
    unused = tuple(f"model.{name}." for name in c.compression_spec.unused_modules(c))
    if cfg.stage == "compress" and cfg.trainable is None:  # the method's own modules learn here by default
        prefixes += tuple(f"model.{name}." for name in model.model.compression_modules)
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes) and not name.startswith(unused))
        if p.requires_grad:
            trained.append(name)
    return trained


# ---------------------------------------------------------------------- the stages


def _finish(trainer: Trainer, cfg: TrainConfig, save) -> Path:
    out = Path(cfg.output_dir) / "model"
    if trainer.is_world_process_zero():
        with atomic_dir(out, overwrite=True) as tmp:
            save(tmp)
            (tmp / "train_config.yaml").write_text(cfg.to_yaml())
            curve = val_curve(trainer.state.log_history)
            if curve:  # the validation curve, and whether it had flattened (training/plateau.py)
                o, st = cfg.optim, trainer.state
                (tmp / "val_curve.json").write_text(json.dumps({
                    "steps": [s for s, _ in curve], "val_loss": [v for _, v in curve],
                    "final_step": st.global_step, "kept_step": kept_step(st),
                    "flat": is_flat(curve, o.stop_when_flat or FLAT_TOLERANCE, o.flat_window),
                    "relative_gain_last_window": relative_gain(curve, o.flat_window), "window": o.flat_window,
                    "tolerance": o.stop_when_flat or FLAT_TOLERANCE}, indent=1) + "\n")
    trainer.accelerator.wait_for_everyone()
    return out


def kept_step(state) -> int:
    """The step of the final weights: the checkpoint ``load_best_model_at_end`` put back (HF records one
    only with ``optim.keep_best``), else the last step."""
    best = state.best_model_checkpoint
    return checkpoint_step(best) if best else state.global_step


def _train_vision(cfg: TrainConfig, callbacks) -> Path:
    from ..presets import tiny_vision_config
    from .vision_pretrain import SceneAttributeDataset, VisionPretrainModel

    if not cfg.data.scenes:
        raise HTCError("the vision stage needs data.scenes (a scenes.jsonl of the generated benchmark); "
                       "it is for the embedded default only: real-scale models start from CLIP")
    torch.manual_seed(cfg.optim.seed)
    vc = tiny_vision_config()
    model = VisionPretrainModel(vc)
    data = SceneAttributeDataset(cfg.data.scenes, cfg.data.images, vc.image_size, vc.patch_size)
    trainer = HTCTrainer(model=model, args=training_arguments(cfg), train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=last_checkpoint(cfg.output_dir))
    return _finish(trainer, cfg, lambda tmp: model.save_tower(tmp))


def train(cfg: TrainConfig, callbacks: list | None = None) -> Path:
    """Run (or resume) one stage; returns the folder of the final model."""
    callbacks = [CommitMarker(), ProgressCallback()] + list(callbacks or [])  # progress: for reproduce's display
    if cfg.stage == "vision":
        return _train_vision(cfg, callbacks)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(cfg.optim.seed)
    model = _load_htc(cfg, tokenizer)
    model.image_processing = image_processing(cfg, model)  # saved with every checkpoint: how to feed the tower
    model.config.chat_template = cfg.data.template  # and the prompts it learns
    if cfg.stage == "compress" and model.config.compression_spec.uncompressed:
        from ..methods.compression import COMPRESSIONS

        known = ", ".join(n for n, c in COMPRESSIONS.items() if not c.uncompressed)
        raise HTCError(f"the compress stage needs a compressing model.compression: {known}")
    if cfg.stage in ("align", "instruct") and not model.config.compression_spec.uncompressed:
        raise HTCError(f"the {cfg.stage} stage trains the uncompressed model; set model.compression=none")
    freeze_for_stage(model, cfg)
    features = None
    if model.config.needs_latents:
        from ..vq.store import FeatureStore

        if not cfg.data.features:
            raise HTCError(f"compression={model.config.compression!r} needs data.features (a discrete feature store)")
        features = FeatureStore(cfg.data.features, expected_dim=model.config.discrete_dim)
    def dataset(path: str) -> LlavaDataset:
        d = cfg.data
        return LlavaDataset(path, d.images, tokenizer, model.config, d.template, features, d.max_length,
                            model.image_processing, d.pack_by_image)

    data = dataset(cfg.data.conversations)
    val = None
    if cfg.optim.eval_steps:
        val = dataset(cfg.data.val_conversations)
        if cfg.data.val_items:
            val = torch.utils.data.Subset(val, range(min(cfg.data.val_items, len(val))))
        if cfg.optim.stop_when_flat:
            callbacks.append(StopWhenFlat(cfg.optim.stop_when_flat, cfg.optim.flat_window, cfg.optim.min_steps))
    trainer = HTCTrainer(model=model, args=training_arguments(cfg), train_dataset=data, eval_dataset=val,
                         data_collator=Collator(tokenizer.pad_token_id), processing_class=tokenizer,
                         callbacks=callbacks)
    trainer.train(resume_from_checkpoint=last_checkpoint(cfg.output_dir))

    def save(tmp: Path) -> None:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _finish(trainer, cfg, save)
