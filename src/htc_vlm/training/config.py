"""Typed training configuration: dataclass defaults, YAML presets as overrides, ``key=value`` on top.

A preset YAML holds the fields common to every stage and a ``stages:`` map of per-stage overrides;
the chosen ``stage`` picks one. Unknown keys anywhere are an error naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configuration import FUSIONS, VISION_ATTENTIONS
from ..data.images import IMAGE_NORMS
from ..data.processor import ASPECTS
from ..data.llava import TEMPLATES
from ..errors import HTCError

STAGES = ("vision", "align", "instruct", "compress")
PRESET_DIR = Path(__file__).parent / "presets"
DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


@dataclass
class ModelSpec:
    arch: str = "tiny"  # architecture registry name, for models built from parts
    init: str | None = None  # an HTC checkpoint folder to continue from (the previous stage's output)
    llava: str | None = None  # a local transformers LLaVA checkpoint to start from
    vision_tower: str | None = None  # a pretrained vision tower folder (vision stage output, local CLIP)
    language_model: str | None = None  # a local causal-LM folder (e.g. Vicuna-7B v1.5)
    compression: str | None = None  # none / voco / htc / discrete / avgpool / qformer (None: keep the init's)
    num_voco: int | None = None
    pool_tokens: int | None = None
    num_anchors: int | None = None
    vision_attention: str | None = None
    fusion: str | None = None
    attn_implementation: str = "sdpa"

    def overrides(self) -> dict:
        keys = ("compression", "num_voco", "pool_tokens", "num_anchors", "vision_attention", "fusion")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class DataSpec:
    conversations: str = ""  # LLaVA conversation JSON (captions for align)
    images: str = ""  # image folder; records' "image" fields are relative to it
    scenes: str | None = None  # vision stage: scenes.jsonl with the ground-truth objects
    features: str | None = None  # discrete feature store (htc / discrete)
    tokenizer: str | None = None  # a tokenizer folder (<image> / <voco> are added if missing); unset: model.llava's
    template: str = "plain"  # plain / vicuna_v1
    max_length: int = 1024
    # How images become pixels (data/processor.py). Unset: the starting checkpoint's processor (its
    # preprocessor_config.json: model.init, model.llava, or model.vision_tower when built from parts),
    # else exact-size images in [-1, 1]. Set, they replace the checkpoint's (the new model saves them).
    image_norm: str | None = None  # half: [-1, 1]; clip: CLIP mean / std
    image_aspect_ratio: str | None = None  # exact / resize / crop (llava-hf) / pad (LLaVA-1.5)
    resize: bool = False  # short for image_aspect_ratio=resize (images of other sizes are squashed)
    # One sequence per image holding all its records, each seeing the image block but not the others
    # (exactly as if alone): the image is run once per epoch instead of once per question.
    pack_by_image: bool = False
    # Validation conversations (same format) whose loss is logged every optim.eval_steps steps, and how
    # many of their items to use (0: all).
    val_conversations: str | None = None
    val_items: int = 0


@dataclass
class OptimSpec:
    """The subset of ``transformers.TrainingArguments`` a recipe sets; passed through by name."""

    learning_rate: float = 1e-3
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03  # a share of the steps; >= 1: that many steps (transformers reads both so)
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a JSON path, or zero2 / zero3 for the shipped files
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 0
    # Batches of similar lengths (shuffled in groups of 50 batches): less padding, same samples per epoch.
    group_by_length: bool = False
    dataloader_num_workers: int = 0
    # Validation loss every eval_steps steps (0: never; needs data.val_conversations). With
    # stop_when_flat > 0, training ends once the best validation loss of the last flat_window share of
    # the steps improved by less than that fraction (training/plateau.py); max_steps stays the cap.
    eval_steps: int = 0
    stop_when_flat: float = 0.0
    flat_window: float = 0.2
    min_steps: int = 0
    # keep_best: the final model is the checkpoint of the lowest validation loss, not the last step's
    # (HF's load_best_model_at_end on eval_loss; needs eval_steps). A checkpoint is then saved at every
    # evaluation (save_steps is eval_steps), and the best one outlives save_total_limit's rotation.
    keep_best: bool = False


PARTS = {  # names for model.trainable -> parameter-name prefixes
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "language_model": ("model.language_model.", "lm_head."),
    "voco": ("model.voco_embeddings.",),
    "anchors": ("model.anchor_projector.", "model.discrete_projector."),
    "pooler": ("model.visual_pooler.",),
}
DEFAULT_TRAINABLE = {  # the paper's recipe (VoCo-LLaMA / LLaVA-1.5); the vision tower stays frozen
    "align": ("projector",),
    "instruct": ("projector", "language_model"),
    "compress": ("projector", "language_model", "voco", "anchors", "pooler"),
}


@dataclass
class TrainConfig:
    stage: str = "instruct"
    output_dir: str = "runs/train"
    trainable: list[str] | None = None  # parts to train (see PARTS); None: DEFAULT_TRAINABLE[stage]
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)

    def __post_init__(self):
        if self.optim.eval_steps and not self.data.val_conversations:
            raise HTCError("optim.eval_steps needs data.val_conversations (the validation conversations)")
        if self.optim.stop_when_flat and not self.optim.eval_steps:
            raise HTCError("optim.stop_when_flat needs optim.eval_steps > 0 (a validation curve to watch)")
        if self.optim.keep_best and not self.optim.eval_steps:
            raise HTCError("optim.keep_best needs optim.eval_steps > 0 (a validation loss to choose by)")
        if not 0 < self.optim.flat_window < 1:
            raise HTCError(f"optim.flat_window must be between 0 and 1, got {self.optim.flat_window}")
        if self.stage not in STAGES:
            raise HTCError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGES)}")
        for part in self.trainable or ():
            if part not in PARTS:
                raise HTCError(f"unknown trainable part {part!r}; parts: {', '.join(PARTS)}")
        m, d = self.model, self.data
        from ..methods.compression import known_compressions

        for name, value, known in (("model.compression", m.compression, known_compressions()),
                                   ("model.vision_attention", m.vision_attention, VISION_ATTENTIONS),
                                   ("model.fusion", m.fusion, FUSIONS),
                                   ("model.attn_implementation", m.attn_implementation, ("sdpa", "eager")),
                                   ("data.image_norm", d.image_norm, tuple(IMAGE_NORMS)),
                                   ("data.image_aspect_ratio", d.image_aspect_ratio, ASPECTS),
                                   ("data.template", d.template, tuple(TEMPLATES))):
            if value is not None and value not in known:
                raise HTCError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        for name, value, least in (("model.num_voco", m.num_voco, 1), ("model.pool_tokens", m.pool_tokens, 1),
                                   ("model.num_anchors", m.num_anchors, 1), ("data.max_length", d.max_length, 1),
                                   ("data.val_items", d.val_items, 0),
                                   ("optim.per_device_train_batch_size", self.optim.per_device_train_batch_size, 1),
                                   ("optim.gradient_accumulation_steps", self.optim.gradient_accumulation_steps, 1)):
            if value is not None and value < least:
                raise HTCError(f"{name} must be at least {least}, got {value}")

    def trainable_prefixes(self) -> tuple[str, ...]:
        parts = self.trainable if self.trainable is not None else DEFAULT_TRAINABLE[self.stage]
        return tuple(p for part in parts for p in PARTS[part])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _merge(base: dict, update: dict, where: str, schema) -> dict:
    out = dict(base)
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in update.items():
        if key not in names:
            raise HTCError(f"unknown config key {where}{key!r}; known: {', '.join(names)}")
        sub = {"model": ModelSpec, "data": DataSpec, "optim": OptimSpec}.get(key) if schema is TrainConfig else None
        if sub is not None:
            if not isinstance(value, dict):
                raise HTCError(f"config key {where}{key} must be a mapping")
            out[key] = _merge(out.get(key, {}), value, f"{where}{key}.", sub)
        else:
            out[key] = _coerce(value, names[key].type, f"{where}{key}")
    return out


def _coerce(value, annotation: str, name: str):
    """``value`` as its field's type, or an HTCError naming the key: YAML 1.1 reads ``2e-5`` as a
    string, so numbers may come as text; anything else of the wrong kind (``bf16=maybe``, a number
    for a list) is refused rather than carried into training."""
    kinds = {t.strip() for t in str(annotation).split("|")}
    if value is None:
        if "None" in kinds:
            return None
        raise HTCError(f"config key {name} must be given a value")
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        raise HTCError(f"config key {name} must be true or false, got {value!r}")
    if isinstance(value, bool):  # YAML's yes / no / on / off are booleans: never a number or a name here
        raise HTCError(f"config key {name} must be {' or '.join(sorted(kinds - {'None'}))}, got {value!r}")
    try:
        if "float" in kinds and isinstance(value, (int, float, str)):
            return float(value)
        if "int" in kinds and isinstance(value, (int, float, str)):
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
    except ValueError:
        raise HTCError(f"config key {name} must be a{'n integer' if 'int' in kinds else ' number'}, got {value!r}") from None
    if "str" in kinds:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise HTCError(f"config key {name} must be a string, got {value!r}")
    if "list[str]" in kinds:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise HTCError(f"config key {name} must be a list of names, e.g. [projector, language_model], got {value!r}")
    return value


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise HTCError(f"override {item!r} must be key=value (e.g. optim.learning_rate=2e-5)")
    key, raw = item.split("=", 1)
    value = _yaml(raw, f"override {item!r}") if raw else None
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def preset_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise HTCError(f"config file not found: {p}")
        return p
    shipped = PRESET_DIR / f"{name_or_path}.yaml"
    if not shipped.exists():
        known = ", ".join(sorted(f.stem for f in PRESET_DIR.glob("*.yaml")))
        raise HTCError(f"unknown training preset {name_or_path!r}; shipped: {known} (or give a .yaml path)")
    return shipped


def _yaml(text: str, where: str):
    """Plain YAML data (safe_load: a Python tag builds nothing) or one error naming ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise HTCError(f"{where} is not plain YAML{at}: {problem}") from None


def load_config(name_or_path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A preset name or YAML path, with ``key=value`` overrides (``stage=compress``)."""
    path = preset_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HTCError(f"cannot read config file {path}: {e}") from None
    raw = _yaml(text, f"config file {path}") or {}
    if not isinstance(raw, dict):
        raise HTCError(f"config file {path} must be a mapping of config keys, not {type(raw).__name__}")
    stages = raw.pop("stages", {}) or {}
    if not isinstance(stages, dict) or not all(isinstance(v, dict | None) for v in stages.values()):
        raise HTCError(f"config file {path}: 'stages:' must map stage names to config keys")
    stages = {k: v or {} for k, v in stages.items()}
    over: dict = {}
    for item in overrides:
        over = _merge_plain(over, _parse_override(item))
    stage = over.get("stage", raw.get("stage", TrainConfig.stage))
    if stage not in STAGES:
        raise HTCError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    for s in stages:
        if s not in STAGES:
            raise HTCError(f"unknown stage {s!r} under 'stages:'; stages: {', '.join(STAGES)}")
    merged: dict = {}
    for layer in (raw, stages.get(stage, {}), over):
        merged = _merge(merged, layer, "", TrainConfig)
    merged["stage"] = stage
    return TrainConfig(model=ModelSpec(**merged.pop("model", {})), data=DataSpec(**merged.pop("data", {})),
                       optim=OptimSpec(**merged.pop("optim", {})), **merged)


def _merge_plain(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_plain(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_path(value: str | None) -> str | None:
    if value is None or value.endswith(".json"):
        return value
    shipped = DEEPSPEED_DIR / f"{value}.json"
    if not shipped.exists():
        raise HTCError(f"unknown DeepSpeed config {value!r}; shipped: zero2, zero3 (or give a .json path)")
    return str(shipped)
