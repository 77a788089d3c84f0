import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from htc_vlm import HTCError, HTCForConditionalGeneration
from htc_vlm.cli import main
from htc_vlm.presets import build_config
from htc_vlm.training.config import PRESET_DIR, load_config
from htc_vlm.training.run import MARKER, last_checkpoint, train

from helpers import train_args


def test_every_shipped_yaml_builds_its_config(tmp_path):
    from htc_vlm.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    presets = sorted(PRESET_DIR.glob("*.yaml"))
    assert {p.stem for p in presets} == {"tiny", "llava-1.5-7b"}
    for path in presets:
        stages = yaml.safe_load(path.read_text())["stages"]
        for stage in stages:
            cfg = load_config(path.stem, [f"stage={stage}"])
            assert cfg.stage == stage and cfg.model.arch == path.stem
            if stage != "vision":
                config = build_config(cfg.model.arch, tok, **cfg.model.overrides())
                assert config.compression == (cfg.model.compression or "none")
    big = build_config("llava-1.5-7b", tok, compression="htc")
    assert (big.num_patches, big.discrete_dim, big.num_image_tokens) == (576, 14112, 580)
    assert big.text_config.hidden_size == 4096 and big.vision_feature_layer == -2
    # the 7B recipe, its dimensions shrunk, builds and runs a forward
    small = build_config("llava-1.5-7b", tok, compression="htc", anchor_hidden_size=64,
                         vision_config=big.vision_config.to_dict() | dict(hidden_size=32, intermediate_size=64,
                                                                          num_hidden_layers=2, num_attention_heads=4),
                         text_config=big.text_config.to_dict() | dict(hidden_size=64, intermediate_size=128,
                                                                      num_hidden_layers=2, num_attention_heads=4,
                                                                      num_key_value_heads=4))
    model = HTCForConditionalGeneration(small)
    assert model.model.anchor_projector.linear_1.in_features == 14112
    cfg = load_config("llava-1.5-7b", ["stage=compress"])
    assert cfg.optim.learning_rate == 2e-5 and cfg.optim.deepspeed == "zero3" and cfg.optim.bf16
    for name in ("zero2", "zero3"):
        assert json.loads((PRESET_DIR.parent / "deepspeed" / f"{name}.json").read_text())["zero_optimization"]


@pytest.mark.parametrize("overrides, message", [
    (["optim.learnig_rate=1"], "unknown config key optim.'learnig_rate'"),
    (["modle.arch=tiny"], "unknown config key 'modle'"),
    (["stage=pretrain"], "unknown stage 'pretrain'"),
    (["trainable=[eyes]"], "unknown trainable part 'eyes'"),
    (["lr"], "must be key=value"),
])
def test_bad_config_keys(overrides, message):
    with pytest.raises(HTCError, match=message):
        load_config("tiny", overrides)


def test_stages_train_and_save_loadable_models(instructed):
    run = instructed
    model = HTCForConditionalGeneration.from_pretrained(run / "instruct" / "model")
    assert model.config.compression == "none"
    assert (run / "instruct" / "model" / "tokenizer.json").exists()
    assert yaml.safe_load((run / "instruct" / "model" / "train_config.yaml").read_text())["stage"] == "instruct"
    assert (Path(last_checkpoint(run / "instruct")) / MARKER).exists()
    # the vision tower is frozen after its stage: instruct kept it exactly
    tower = load_file(run / "vision" / "model" / "model.safetensors")
    ours = {k.removeprefix("model.vision_tower."): v for k, v in model.state_dict().items() if "vision_tower" in k}
    assert all(torch.equal(ours[k], v) for k, v in tower.items())


@pytest.mark.parametrize("compression", ["htc", "voco", "discrete"])
def test_compress_stage(instructed, compression):
    run = instructed
    before = HTCForConditionalGeneration.from_pretrained(run / "instruct" / "model")
    assert main(["train", "--config", "tiny", *train_args(run, "compress", f"c-{compression}", "optim.max_steps=2",
                                                      f"model.init={run / 'instruct' / 'model'}",
                                                      f"model.compression={compression}")]) == 0
    after = HTCForConditionalGeneration.from_pretrained(run / f"c-{compression}" / "model")
    assert after.config.compression == compression and after.config.num_voco == 1
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(b[k], a[k]) for k in b if "vision_tower" in k)
    assert not torch.equal(b["lm_head.weight"], a["lm_head.weight"])


def _final_weights(path):
    return load_file(Path(path) / "model" / "model.safetensors")


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_same_seed_same_weights_and_resume_equals_uninterrupted(instructed):
    run = instructed
    base = train_args(run, "instruct", "", "optim.max_steps=4", "optim.save_steps=2", f"model.init={run / 'align' / 'model'}")

    def cfg(out):
        return load_config("tiny", base + [f"output_dir={run / out}"])

    train(cfg("det-a"))
    train(cfg("det-b"))
    a, b = _final_weights(run / "det-a"), _final_weights(run / "det-b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    train(cfg("det-c"), callbacks=[StopAt(2)])  # interrupted after step 2 (its checkpoint saved)
    assert Path(last_checkpoint(run / "det-c")).name == "checkpoint-2"
    train(cfg("det-c"))  # resumes from checkpoint-2
    c = _final_weights(run / "det-c")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(instructed):
    run = instructed
    out = run / "nan"
    cfg = load_config("tiny", train_args(run, "instruct", "nan", "optim.max_steps=6", "optim.save_steps=1",
                                    "optim.learning_rate=1e30", "optim.max_grad_norm=0", "optim.warmup_ratio=0",
                                    f"model.init={run / 'align' / 'model'}"))
    with pytest.raises(HTCError, match="the loss became nan.*last good checkpoint: .*checkpoint-"):
        train(cfg)
    last = Path(last_checkpoint(out))
    HTCForConditionalGeneration.from_pretrained(last)  # intact and loadable
    assert not (out / "model").exists()


def test_bad_training_data_is_named(instructed, tmp_path):
    run = instructed
    convs = json.loads((run / "scenes/train/conversations.json").read_text())[:4]
    cases = {
        "no-image-token": lambda c: c[1]["conversations"][0].update(value="What?"),
        "missing-image": lambda c: c[2].update(image="nope.png"),
    }
    for name, spoil in cases.items():
        data = json.loads(json.dumps(convs))
        spoil(data)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        cfg = load_config("tiny", train_args(run, "instruct", f"bad-{name}", "optim.max_steps=1",
                                        f"model.init={run / 'align' / 'model'}", f"data.conversations={path}"))
        with pytest.raises(HTCError, match=r"sample 'train_000000-0[12]'"):
            train(cfg)
    # an image id missing from the feature store
    from htc_vlm.vq.store import write_store

    write_store({"other.png": torch.zeros(32 * 12 * 12)}, tmp_path / "f.safetensors")
    cfg = load_config("tiny", train_args(run, "compress", "bad-store", "optim.max_steps=1", "model.compression=htc",
                                    f"model.init={run / 'instruct' / 'model'}", f"data.features={tmp_path / 'f.safetensors'}"))
    with pytest.raises(HTCError, match="image id 'train_000000.png' is not in the feature store"):
        train(cfg)


def test_torchrun_two_ranks_hold_identical_weights(instructed, tmp_path):
    run = instructed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(Path(__file__).parent / "train_ddp_script.py"), str(tmp_path),
           *train_args(run, "instruct", "ddp", "optim.max_steps=2", f"model.init={run / 'align' / 'model'}")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.sha").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    assert (run / "ddp" / "model" / "model.safetensors").exists()


def test_multi_turn_llava_records_get_labels_on_answers_only(scenes_dir):
    from transformers import AutoTokenizer

    from htc_vlm.data.llava import PromptBuilder, get_template
    from htc_vlm.presets import build_config

    tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
    cfg = build_config("tiny", tok, compression="htc")
    turns = [{"from": "human", "value": "What color is the circle?\n<image>"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "3"}]
    ids, labels = PromptBuilder(tok, get_template("plain"), cfg).conversation(turns, True, "x")
    text = tok.decode(ids)
    assert text.startswith("USER :") and "<image>" in text  # <image> moved before the first question
    n_img, n_voco = ids.count(cfg.image_token_id), ids.count(cfg.voco_token_id)
    assert (n_img, n_voco) == (cfg.num_image_tokens, 1)
    first_voco = ids.index(cfg.voco_token_id)
    assert ids[first_voco - n_img:first_voco] == [cfg.image_token_id] * n_img  # block then voco, contiguous
    supervised = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(supervised) == "red </s> 3 </s>"
    assert "USER : How many objects are there ? ASSISTANT :" in text


@pytest.mark.parametrize("compression", ["none", "voco", "htc"])
def test_packed_records_compute_exactly_as_alone(scenes_dir, compression):
    """pack_by_image: every record of a packed item gets the logits it gets alone, and the image runs once."""
    from transformers import AutoTokenizer

    from htc_vlm.data.llava import Collator, LlavaDataset
    from htc_vlm.vq.store import FeatureStore

    tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
    torch.manual_seed(0)
    model = HTCForConditionalGeneration(build_config("tiny", tok, compression=compression)).eval()
    features = None
    if compression == "htc":
        from safetensors.torch import save_file
        recs = json.loads((scenes_dir / "train" / "conversations.json").read_text())
        path = scenes_dir.parent / "packing-features.safetensors"
        save_file({r["image"]: torch.randn(model.config.discrete_dim) for r in recs}, str(path))
        features = FeatureStore(path, expected_dim=model.config.discrete_dim)
    args = (scenes_dir / "train" / "conversations.json", scenes_dir / "images", tok, model.config, "plain", features)
    alone, packed = LlavaDataset(*args), LlavaDataset(*args, pack_by_image=True)
    images = {r["image"] for r in alone.records}
    assert len(packed) == len(images) < len(alone)
    assert sorted(r for item in packed.items for r in item) == list(range(len(alone)))
    assert len(packed.lengths()) == len(packed)
    collate = Collator(tok.pad_token_id)
    item = max(range(len(packed)), key=lambda i: len(packed.items[i]))
    records = packed.items[item]
    assert len(records) >= 3
    batch = collate([packed[item], packed[(item + 1) % len(packed)]])  # left padding in the batch too
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        segs, labels = batch["segment_ids"][0], batch["labels"][0]
        for seg, r in enumerate(records, start=1):
            single = collate([alone[r]])
            ref = model(**{k: v for k, v in single.items() if k != "labels"}).logits[0]
            n = int((single["labels"][0] != -100).sum()) + 1  # the answer, its eos and the question's last token
            pos = (segs == seg).nonzero().flatten()
            torch.testing.assert_close(logits[pos][-n:], ref[-n:], atol=2e-5, rtol=1e-4)
            assert torch.equal(labels[pos], single["labels"][0][-len(pos):])
    # one record never sees another: changing record 1 leaves record 2's logits untouched
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    first = (segs == 1).nonzero().flatten()
    changed["input_ids"][0, first[:-1]] = tok.convert_tokens_to_ids("red")
    with torch.no_grad():
        other = model(**{k: v for k, v in changed.items() if k != "labels"}).logits[0]
    second = (segs == 2).nonzero().flatten()
    torch.testing.assert_close(other[second], logits[second], atol=1e-6, rtol=0)
    assert not torch.allclose(other[first], logits[first])


def test_group_by_length_batches_similar_lengths_without_loading_images(scenes_dir, tmp_path):
    from transformers import AutoTokenizer

    from htc_vlm.data.llava import Collator, LlavaDataset
    from htc_vlm.training.config import TrainConfig
    from htc_vlm.training.run import HTCTrainer, training_arguments

    tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
    config = build_config("tiny", tok)
    data = LlavaDataset(scenes_dir / "train" / "conversations.json", scenes_dir / "images", tok, config)
    words = data.lengths()
    exact = [len(data[i]["input_ids"]) for i in range(len(data))]
    assert torch.corrcoef(torch.tensor([words, exact], dtype=torch.float))[0, 1] > 0.9  # a fair proxy

    def padded_tokens(group: bool) -> int:
        cfg = TrainConfig(output_dir=str(tmp_path / str(group)))
        cfg.optim.per_device_train_batch_size, cfg.optim.group_by_length = 8, group
        trainer = HTCTrainer(model=HTCForConditionalGeneration(config), args=training_arguments(cfg),
                             train_dataset=data, data_collator=Collator(tok.pad_token_id))
        if group:  # lengths from the dataset's word counts: the sampler never loads a sample
            assert trainer._get_train_sampler().lengths == words
        return sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())

    assert padded_tokens(True) < 0.9 * padded_tokens(False)


def test_packing_keeps_text_only_records_alone_and_splits_at_max_length(scenes_dir, tmp_path):
    from transformers import AutoTokenizer

    from htc_vlm.data.llava import Collator, LlavaDataset

    tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
    torch.manual_seed(0)
    model = HTCForConditionalGeneration(build_config("tiny", tok)).eval()
    recs = json.loads((scenes_dir / "train" / "conversations.json").read_text())
    image = recs[0]["image"]
    same = [r for r in recs if r["image"] == image][:3]
    text = {"id": "t", "conversations": [{"from": "human", "value": "How many objects are there?"},
                                         {"from": "gpt", "value": "2"}]}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(same + [text]))
    args = (path, scenes_dir / "images", tok, model.config)
    packed = LlavaDataset(*args, pack_by_image=True)
    assert packed.items == [[0, 1, 2], [3]]
    alone = LlavaDataset(*args)
    collate = Collator(tok.pad_token_id)
    with torch.no_grad():
        got = model(**{k: v for k, v in collate([packed[1]]).items() if k != "labels"}).logits
        want = model(**{k: v for k, v in collate([alone[3]]).items() if k != "labels"}).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    head = len(alone.builder.head_ids(True))
    n = [len(alone[i]["input_ids"]) - head for i in range(3)]
    cap = head + n[0] + n[1]  # room for the first two records, not the third
    small = LlavaDataset(*args, max_length=cap, pack_by_image=True)
    assert small.items == [[0, 1], [2], [3]]
    assert [len(small[i]["input_ids"]) for i in range(2)] == [cap, head + n[2]]


def test_flatness_criterion_on_written_curves():
    from htc_vlm.training.plateau import is_flat, relative_gain

    falling = [(100, 1.0), (200, 0.8), (300, 0.6), (400, 0.5), (500, 0.4)]
    assert relative_gain(falling, 0.2) == pytest.approx((0.5 - 0.4) / 0.5)  # best before step 400 vs best now
    assert not is_flat(falling)
    flat = [(100, 1.0), (200, 0.8), (300, 0.7), (400, 0.7), (500, 0.6995)]
    assert is_flat(flat, tolerance=0.01)
    assert not is_flat(flat, tolerance=0.0001)
    noisy_up = [(100, 1.0), (200, 0.7), (300, 0.71), (400, 0.72), (500, 0.73)]  # best loss unchanged: flat
    assert relative_gain(noisy_up, 0.2) == 0 and is_flat(noisy_up)
    assert relative_gain(falling[:1], 0.2) is None and not is_flat(falling[:1])  # too early to judge
    assert relative_gain([(100, 1.0), (200, 0.9), (1000, 0.1)], 0.5) == pytest.approx((0.9 - 0.1) / 0.9)


def test_trend_gain_reads_a_slope_through_noise():
    """A line through the later evaluations: exact on a straight line, about zero on noise around a
    level where the best-loss test sees a gain, positive on a slow fall hidden under noise."""
    import random

    from htc_vlm.training.plateau import relative_gain, trend_gain

    line = [(s, 1.0 - 0.0001 * s) for s in range(100, 1100, 100)]  # 0.99 at step 100 ... 0.90 at 1,000
    gain, se = trend_gain(line, 0.2)  # fit over steps >= 600: the loss falls 0.02 over the last 200 steps
    mean = sum(v for s, v in line if s >= 600) / 5
    assert gain == pytest.approx(0.02 / mean) and se == pytest.approx(0.0, abs=1e-12)
    rng = random.Random(0)
    level = [(s, 0.4 + rng.gauss(0, 0.012)) for s in range(100, 3100, 100)]  # 3% noise, no trend
    g, se = trend_gain(level, 0.2)
    assert abs(g) < 2.5 * se and se > 0.005
    rng = random.Random(1)
    slow = [(s, 0.45 - 0.00002 * s + rng.gauss(0, 0.002)) for s in range(100, 3100, 100)]
    g, se = trend_gain(slow, 0.2)
    assert g - 2 * se > 0.01  # ~2.7% over the last 600 steps, resolved
    assert trend_gain(line[:3], 0.2) is None and trend_gain([], 0.2) is None
    assert relative_gain(level, 0.2) is not None  # the best-loss test answers on the same noise


def test_convergence_script_judges_every_prefix_of_a_curve(tmp_path):
    """benchmarks/convergence.py: a curve with a pause in its fall is flat first where the pause fills the
    window (an early stop would fire there) and flat for good only once the fall has ended; a curve still
    falling is never flat; each best-so-far is put against the whole curve's best."""
    from helpers import benchmark_script

    cv = benchmark_script("convergence")

    def paused(s):  # falls to 0.8 by step 800, pauses to 1,400, falls again to 0.5 at 2,600, then level
        return 1 - s / 4000 if s < 800 else 0.8 if s <= 1400 else max(0.5, 0.8 - (s - 1400) / 4000)

    curve = [(s, paused(s)) for s in range(100, 4100, 100)]
    r = cv.judge(curve, 0.2, [2000, 3000, 6000], start=500)
    # 1,000: the window's start (800) reaches the pause; 3,300: its start (2,640) is past the fall (2,600)
    assert (r["first_flat"], r["flat_from"], r["flat_at_end"], r["final_step"]) == (1000, 3300, True, 4000)
    assert r["above_best_pct"] == {2000: 30.0, 3000: 0.0} and not r["falling_at_end"]
    falling = [(s, 1 - s / 8000) for s in range(100, 4100, 100)]
    f = cv.judge(falling, 0.2, [3000], start=500)
    assert (f["first_flat"], f["flat_from"], f["flat_at_end"], f["falling_at_end"]) == (None, None, False, True)
    for name, c in (("paused", curve), ("falling", falling)):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "val_curve.json").write_text(json.dumps(
            {"steps": [s for s, _ in c], "val_loss": [v for _, v in c], "window": 0.2}))
    cv.main([str(tmp_path / "paused" / "model"), str(tmp_path / "falling" / "model" / "val_curve.json"),
             "--from", "500", "--at", "3000", "--out", str(tmp_path / "c.json")])
    got = json.loads((tmp_path / "c.json").read_text())
    assert got[str(tmp_path / "paused" / "model")]["flat_from"] == 3300
    assert got[str(tmp_path / "falling" / "model")]["above_best_pct"] == {"3000": 25.0}  # 0.625 against 0.5
    with pytest.raises(SystemExit, match="no val_curve.json"):
        cv.main([str(tmp_path)])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="bad.json: not a validation curve"):
        cv.main([str(tmp_path / "bad.json")])


def test_compress_run_stops_when_its_validation_loss_is_flat(instructed):
    """A tolerance no run can miss stops at the first evaluation that has two before its window; the
    saved curve says where and why; a tolerance of 0 runs to the cap and is flagged not flat."""
    run = instructed
    s = run / "scenes"
    common = [f"model.init={run / 'instruct' / 'model'}", "model.compression=voco",
              f"data.val_conversations={s / 'val' / 'conversations.json'}", "data.val_items=2",
              "optim.eval_steps=1", "optim.max_steps=12", "data.pack_by_image=true"]
    assert main(["train", "--config", "tiny", *train_args(run, "compress", "flat", *common, "optim.stop_when_flat=1.0")]) == 0
    curve = json.loads((run / "flat" / "model" / "val_curve.json").read_text())
    assert curve["flat"] and curve["final_step"] == 3 < 12 and curve["steps"] == [1, 2, 3]
    assert main(["train", "--config", "tiny", *train_args(run, "compress", "cap", *common)]) == 0
    capped = json.loads((run / "cap" / "model" / "val_curve.json").read_text())
    assert capped["final_step"] == 12 and len(capped["val_loss"]) == 12
    # at a constant rate after warm-up a longer run passes through a shorter one exactly (benchmarks/
    # convergence.py reads one long curve for every length): 12 steps warm up ceil(0.05 * 12) = 1 step, and
    # warmup_ratio >= 1 counts steps, so this 6-step run is the 12-step run's first half
    assert main(["train", "--config", "tiny", *train_args(run, "compress", "half", *common, "optim.max_steps=6",
                                                          "optim.warmup_ratio=1")]) == 0
    half = json.loads((run / "half" / "model" / "val_curve.json").read_text())
    assert half["steps"] == capped["steps"][:6] and half["val_loss"] == capped["val_loss"][:6]
    with pytest.raises(HTCError, match="stop_when_flat needs optim.eval_steps"):
        load_config("tiny", ["stage=compress", "optim.stop_when_flat=0.01"])
    with pytest.raises(HTCError, match="eval_steps needs data.val_conversations"):
        load_config("tiny", ["stage=compress", "optim.eval_steps=5"])


def test_keep_best_saves_the_checkpoint_of_the_lowest_validation_loss(instructed):
    """With optim.keep_best the final model is the weights of the evaluation with the lowest loss, not
    the last step's. Training teaches one answer ("4") to a question whose validation answer is another
    ("5"): the validation loss falls while the model learns that a digit answers, then rises far above its
    low as it learns which digit, so the last step is not the best (here 3.16 at step 3, 4.31 at step 6)."""
    run = instructed
    rec = json.loads((run / "scenes" / "val" / "conversations.json").read_text())[0]
    rec["conversations"][1]["value"] = "4"
    (run / "answer-4.json").write_text(json.dumps([rec] * 6))
    rec["conversations"][1]["value"] = "5"
    (run / "answer-5.json").write_text(json.dumps([rec]))
    common = [f"model.init={run / 'instruct' / 'model'}", "model.compression=voco",
              f"data.conversations={run / 'answer-4.json'}", f"data.val_conversations={run / 'answer-5.json'}",
              "optim.eval_steps=1", "optim.max_steps=6", "optim.learning_rate=0.005", "optim.warmup_ratio=0",
              "optim.save_total_limit=2", "data.pack_by_image=false"]
    assert main(["train", "--config", "tiny", *train_args(run, "compress", "best", *common, "optim.keep_best=true")]) == 0
    curve = json.loads((run / "best" / "model" / "val_curve.json").read_text())
    losses = dict(zip(curve["steps"], curve["val_loss"]))
    assert curve["steps"] == [1, 2, 3, 4, 5, 6] and curve["final_step"] == 6
    assert curve["kept_step"] == min(losses, key=losses.get) < 6, losses
    kept = load_file(run / "best" / "model" / "model.safetensors")
    at_best = load_file(run / "best" / f"checkpoint-{curve['kept_step']}" / "model.safetensors")
    last = load_file(run / "best" / "checkpoint-6" / "model.safetensors")  # rotation keeps the best and the last
    assert all(torch.equal(kept[k], at_best[k]) for k in kept)
    assert not all(torch.equal(kept[k], last[k]) for k in kept)
    assert main(["train", "--config", "tiny", *train_args(run, "compress", "last", *common)]) == 0
    plain = json.loads((run / "last" / "model" / "val_curve.json").read_text())
    assert plain["val_loss"] == curve["val_loss"] and plain["kept_step"] == 6  # keep_best changes only what is kept
    with pytest.raises(HTCError, match="keep_best needs optim.eval_steps"):
        load_config("tiny", ["stage=compress", "optim.keep_best=true"])


def test_the_image_normalisation_is_saved_with_the_model_and_used_everywhere(instructed, tmp_path, capsys):
    """A model trained on CLIP-normalised pixels records it; eval / compress / ask feed it the same
    pixels without being told, and refuse another normalisation."""
    from htc_vlm.inference import ImageEncoder

    run = instructed
    assert main(["train", "--config", "tiny", *train_args(run, "compress", "c-clip", "optim.max_steps=1",
                                                      f"model.init={run / 'instruct' / 'model'}",
                                                      "model.compression=voco", "data.image_norm=clip")]) == 0
    model = HTCForConditionalGeneration.from_pretrained(run / "c-clip" / "model")
    assert model.config.image_norm == "clip"
    assert ImageEncoder(model).image_norm == "clip"
    assert HTCForConditionalGeneration.from_pretrained(run / "instruct" / "model").config.image_norm == "half"
    capsys.readouterr()
    assert main(["eval", "--model", str(run / "c-clip" / "model"), "--benchmark", "scenes_open", "--questions",
                 str(run / "scenes" / "test" / "open.jsonl"), "--images", str(run / "scenes" / "images"),
                 "--out", str(tmp_path / "ev"), "--image-norm", "half"]) == 2
    assert "the model was trained with 'clip'" in capsys.readouterr().err


def test_a_large_conversation_file_is_indexed_once_and_its_checked_images_remembered(scenes_dir, tmp_path,
                                                                                     monkeypatch):
    """A LLaVA-665k-sized file (here: any file, the size threshold set to 0) is parsed and checked
    once; a later start reads the index instead of the JSON and stats the images instead of opening
    them, with the same items; a changed image is checked again, a broken index is rebuilt."""
    import shutil

    from transformers import AutoTokenizer

    import htc_vlm.data.llava as llava
    import htc_vlm.data.records as records
    from htc_vlm.data.llava import LlavaDataset
    from htc_vlm.presets import build_config

    monkeypatch.setenv("HTC_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(records, "INDEX_BYTES", 0)
    images = tmp_path / "images"
    shutil.copytree(scenes_dir / "images", images)
    tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
    config = build_config("tiny", tok, compression="voco")
    data = scenes_dir / "train" / "conversations.json"
    plain = LlavaDataset(data, images, tok, config)
    assert plain.records.cache is not None and (plain.records.cache / "index.safetensors").exists()

    opened = []
    real = llava.first_bad_image
    monkeypatch.setattr(llava, "first_bad_image", lambda root, names, *a: opened.extend(names) or real(root, names, *a))
    monkeypatch.setattr(records.Records, "_parse", lambda self: pytest.fail("the JSON was parsed again"))
    again = LlavaDataset(data, images, tok, config)
    assert opened == [] and len(again) == len(plain) and again.lengths() == plain.lengths()
    for i in (0, 7, len(plain) - 1):
        assert again.records[i] == json.loads(data.read_text())[i]
        assert torch.equal(again[i]["input_ids"], plain[i]["input_ids"])
    name = again.records.images[3]
    (images / name).write_bytes(b"not a png")  # changed since its check: opened again, and refused by name
    with pytest.raises(HTCError, match=f"record .*cannot decode image .*{name}"):
        LlavaDataset(data, images, tok, config)
    assert opened == [name]
    monkeypatch.undo()
    monkeypatch.setenv("HTC_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(records, "INDEX_BYTES", 0)
    (again.records.cache / "index.safetensors").write_bytes(b"broken")
    shutil.copy(scenes_dir / "images" / name, images / name)
    rebuilt = LlavaDataset(data, images, tok, config)
    assert rebuilt.lengths() == plain.lengths()


def test_record_spans_are_byte_ranges_of_the_file_whatever_the_characters():
    from htc_vlm.data.records import _decode_with_spans

    recs = [{"id": "é", "v": "日本語 🙂"}, {"id": 2, "v": [1, {"x": "\\u00e9"}]}, {}]
    text = " [\n " + " ,\n\t".join(json.dumps(r, ensure_ascii=False) for r in recs) + " ] \n"
    got, spans = _decode_with_spans(text)
    raw = text.encode()
    assert got == recs and [json.loads(raw[a:b]) for a, b in spans] == recs
    assert _decode_with_spans("[]")[0] == []


def test_image_checks_in_worker_processes_report_the_first_bad_image(scenes_dir, tmp_path, monkeypatch):
    """Large sets are checked by a process pool in chunks; the answer is the first bad image in the
    given order, as in one process."""
    import shutil

    import htc_vlm.data.images as images_mod
    from htc_vlm.data.processor import ImageProcessing

    names = sorted(p.name for p in (scenes_dir / "images").iterdir())[:9]
    for n in names:
        shutil.copy(scenes_dir / "images" / n, tmp_path / n)
    (tmp_path / names[7]).write_bytes(b"broken")
    (tmp_path / names[4]).write_bytes(b"broken too")
    monkeypatch.setattr(images_mod, "PARALLEL_FROM", 0)
    exact = ImageProcessing.named(48)
    for workers in (1, 2):
        k, why = images_mod.first_bad_image(tmp_path, names, exact, workers=workers, chunk=2)
        assert k == 4 and names[4] in why
    assert images_mod.first_bad_image(tmp_path, names[:4], exact, workers=2, chunk=2) is None
