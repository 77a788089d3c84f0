"""Bad input gets one clear error naming the problem (exit 2 from the CLI), never a traceback, a
silently wrong result, or a file read outside the folders named on the command line (issue #18)."""

import json
import os
import struct

import pytest
from PIL import Image

from htc_vlm import HTCError
from htc_vlm.cli import main
from htc_vlm.data.images import load_rgb

# ---------------------------------------------------------------------- image files


def _png(path, size=48, mode="RGB"):
    Image.new(mode, (size, size), 128 if mode in ("L", "P", "I;16") else (10, 200, 30)).save(path)
    return path


def _bad_crc(path):
    """A PNG whose IDAT chunk checksum does not match its data (a flipped bit on disk or in transfer;
    Pillow's decoder alone does not look at the checksum)."""
    data = bytearray(_png(path).read_bytes())
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4:i])[0]
    data[i + 4 + n] ^= 0x10  # first byte of the chunk's CRC
    path.write_bytes(bytes(data))
    return path


def _cases(tmp_path):
    (tmp_path / "dir.png").mkdir()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(_png(tmp_path / "whole.png").read_bytes()[:60])
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    return {
        "missing": (tmp_path / "missing.png", "image not found"),
        "a folder": (tmp_path / "dir.png", "is a folder"),
        "zero bytes": (empty, "cannot decode image"),
        "text named .png": (text, "cannot decode image"),
        "truncated": (cut, "cannot decode image"),
        "bad CRC": (_bad_crc(tmp_path / "crc.png"), "cannot decode image"),
        "symlink loop": (loop, "cannot decode image"),
        "wrong size": (_png(tmp_path / "small.png", 10), "is 10x10 but 48x48 is expected"),
    }


@pytest.mark.parametrize("case", ["missing", "a folder", "zero bytes", "text named .png", "truncated", "bad CRC",
                                  "symlink loop", "wrong size"])
def test_a_bad_image_file_is_one_clear_error(tmp_path, case):
    path, message = _cases(tmp_path)[case]
    with pytest.raises(HTCError, match=message):
        load_rgb(path, 48)


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 48 = 2,304 pixels: over the limit here
    with pytest.raises(HTCError, match="too large to decode safely"):
        load_rgb(_png(tmp_path / "bomb.png"), 48)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1"])
def test_other_image_modes_load_as_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    Image.new(mode, (48, 48)).save(path)
    img = load_rgb(path, 48)
    assert img.mode == "RGB" and img.size == (48, 48)


def test_the_crc_check_is_what_catches_a_corrupted_png(tmp_path):
    """Guard for the "bad CRC" case: Pillow alone decodes that file without a word."""
    with Image.open(_bad_crc(tmp_path / "crc.png")) as im:
        im.load()
        assert im.size == (48, 48)


# ---------------------------------------------------------------------- htc-vlm eval


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir("voco")


def _questions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(model, questions, images, out, *extra):
    return main(["eval", "--model", str(model), "--benchmark", "scenes_open", "--questions", str(questions),
                 "--images", str(images), "--out", str(out), "--batch-size", "8", *extra])


def _row(image, text="What color is the circle?", qid="q1"):
    return {"question_id": qid, "image": image, "text": text, "answer": "red"}


@pytest.mark.parametrize("image, message", [
    ("/etc/passwd", "outside the image folder"),
    ("../outside.png", "outside the image folder"),
    ("link.png", "outside the image folder"),  # a symlink inside the folder that points out of it
    (None, "is not a file name"),
    ("", "is not a file name"),
    ("sub", "is a folder"),
    ("missing.png", "image not found"),
])
def test_eval_refuses_image_fields_that_leave_the_folder_or_are_not_images(model_dir, scenes_dir, tmp_path, capsys,
                                                                         image, message):
    images = tmp_path / "images"
    images.mkdir()
    (images / "sub").mkdir()
    _png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", images / "link.png")
    q = _questions(tmp_path / "q.jsonl", [_row(image)])
    assert _eval(model_dir, q, images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "question 'q1'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_eval_refuses_a_question_longer_than_the_context(model_dir, scenes_dir, tmp_path, capsys):
    image = sorted((scenes_dir / "images").glob("test_*.png"))[0].name
    q = _questions(tmp_path / "q.jsonl", [_row(image, qid="short"), _row(image, "what " * 30_000, qid="long")])
    assert _eval(model_dir, q, scenes_dir / "images", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "question 'long' needs" in err and "context is 1024" in err


def test_eval_never_mixes_another_runs_predictions(model_dir, make_model_dir, scenes_dir, tmp_path, capsys):
    """An --out holding predictions of another model, question file or setting is refused; the same
    run resumes."""
    out = tmp_path / "out"
    test = scenes_dir / "test" / "open.jsonl"
    assert _eval(model_dir, test, scenes_dir / "images", out) == 0
    key = json.loads((out / "predictions.key.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_key"] == key and metrics["protocol"] == "VQA accuracy, every answer normalised, one reference answer"
    fewer = _questions(tmp_path / "fewer.jsonl", [json.loads(x) for x in test.read_text().splitlines()[:3]])
    before = (out / "predictions.jsonl").read_bytes()
    assert _eval(model_dir, fewer, scenes_dir / "images", out) == 2
    assert "answered by another model, question file or setting (differs in: questions)" in capsys.readouterr().err
    assert _eval(model_dir, test, scenes_dir / "images", out, "--template", "vicuna_v1") == 2
    assert "differs in: template" in capsys.readouterr().err
    retrained = make_model_dir("none")
    assert _eval(retrained, test, scenes_dir / "images", out) == 2
    assert "differs in: model" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes() == before  # nothing appended, nothing lost
    assert _eval(model_dir, test, scenes_dir / "images", out) == 0  # the same run: resumed, nothing to answer


def test_eval_predictions_are_keyed_to_the_discrete_features_read(make_model_dir, tiny_run, tmp_path, capsys):
    from htc_vlm.vq.store import FeatureStore, write_store

    model = make_model_dir("htc")
    test = tiny_run / "scenes" / "test" / "open.jsonl"
    rows = [json.loads(x) for x in test.read_text().splitlines()[:4]]
    few = _questions(tmp_path / "few.jsonl", rows)
    store = FeatureStore(tiny_run / "features.safetensors")
    other = write_store({i: store[i] + (i == rows[0]["image"]) for i in store.ids()}, tmp_path / "other.safetensors")[0]
    images, out = tiny_run / "scenes" / "images", tmp_path / "out"
    assert _eval(model, few, images, out, "--features", str(tiny_run / "features.safetensors")) == 0
    assert _eval(model, few, images, out, "--features", str(other)) == 2  # one image's q differs
    assert "differs in: features" in capsys.readouterr().err
    assert _eval(model, few, images, out, "--features", str(tiny_run / "features.safetensors")) == 0


def test_eval_refuses_a_predictions_file_that_is_not_one(model_dir, scenes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    test = scenes_dir / "test" / "open.jsonl"
    for content, message in ((b"\xff\xfe\n", "not UTF-8"), (b"[1, 2]\n", "is not a prediction line"),
                             (b'{"benchmark": "scenes_open"}\n', "is not a prediction line")):
        (out / "predictions.jsonl").write_bytes(content)
        assert _eval(model_dir, test, scenes_dir / "images", out) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------- training data


def test_training_data_images_are_checked_before_the_first_step(scenes_dir, tmp_path):
    from transformers import AutoTokenizer

    from htc_vlm.data.llava import LlavaDataset
    from htc_vlm.presets import build_config

    tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
    config = build_config("tiny", tok, compression="none")
    good = json.loads((scenes_dir / "train" / "conversations.json").read_text())[:3]
    images = tmp_path / "images"
    images.mkdir()
    for r in good:
        (images / r["image"]).write_bytes((scenes_dir / "images" / r["image"]).read_bytes())
    _png(tmp_path / "outside.png")
    _bad_crc(images / "crc.png")
    (images / "text.png").write_text("no")
    for image, message in (("../outside.png", "outside the image folder"), ("text.png", "cannot decode image"),
                           (str(tmp_path / "outside.png"), "outside the image folder")):
        data = tmp_path / "d.json"
        data.write_text(json.dumps(good + [good[0] | {"id": "bad", "image": image}]))
        with pytest.raises(HTCError, match=f"sample 'bad'.*{message}"):
            LlavaDataset(data, images, tok, config)
    data.write_text(json.dumps(good))
    assert len(LlavaDataset(data, images, tok, config)) == 3


# ---------------------------------------------------------------------- model folders


def _broken_model(src, tmp_path, case):
    import shutil

    folder = tmp_path / case.replace(" ", "_")
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    if case == "no model_type":
        del config["model_type"]
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "a llava config":
        (folder / "config.json").write_text(json.dumps(config | {"model_type": "llava"}))
    elif case == "config not JSON":
        (folder / "config.json").write_text("{oops")
    elif case == "no config":
        (folder / "config.json").unlink()
    elif case == "truncated weights":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif case == "pickle weights only":
        import torch

        (folder / "model.safetensors").unlink()
        torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    elif case == "weights of another model":
        import torch
        from safetensors.torch import save_file

        save_file({"encoder.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    elif case == "no tokenizer":
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer_config.json").unlink()
    return folder


@pytest.mark.parametrize("case, message", [
    ("no model_type", "holds a untyped model, not an htc-vlm one"),
    ("a llava config", "from_llava"),
    ("config not JSON", "is not a model config"),
    ("no config", "is not a model folder (no config.json)"),
    ("truncated weights", "cannot load the model"),
    ("pickle weights only", "has no safetensors weights"),
    ("weights of another model", "lack"),
    ("no tokenizer", "no readable tokenizer"),
])
def test_a_broken_model_folder_is_one_clear_error(model_dir, tmp_path, capsys, case, message):
    folder = _broken_model(model_dir, tmp_path, case)
    assert main(["ask", "--model", str(folder), "--image", str(tmp_path / "x.png"), "what?"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_model_folder_is_not_looked_up_on_the_hub(tmp_path):
    import time

    from htc_vlm import HTCForConditionalGeneration

    t0 = time.perf_counter()
    for path in (tmp_path / "nope", "./runs/nope", "runs/tiny/nope"):
        with pytest.raises(HTCError, match="model folder not found"):
            HTCForConditionalGeneration.from_pretrained(path)
    assert time.perf_counter() - t0 < 5  # no network retries (they took ~23 s)


# ---------------------------------------------------------------------- question files


@pytest.mark.parametrize("content, message", [
    (b'{"question_id": "q1", "image": "IMG", "text": "What?", "answer": "red"}\n\xff\xfe\n', ":2: not UTF-8 text"),
    (b'{"question_id": "q1", "image": "IMG", "text": "What?"}\n', "missing 'answer'"),
    (b'{"question_id": "q1", "image": "IMG", "text": null, "answer": "red"}\n', "text must be a string"),
    (b'{"question_id": null, "image": "IMG", "text": "What?", "answer": "red"}\n', "question_id must be"),
    (b'{"question_id": "q1", "image": "IMG", "text": "What?", "answer": 3}\n', "answer must be a string"),
    (b'{"question_id": "q1", "image": "IMG", "text": "What?", "answers": []}\n', "non-empty list of strings"),
    (b'{"question_id": "q1", "image": "IMG", "text": "W?", "options": ["a", "b"], "answer": "C"}\n', "option letters AB"),
    (b'{"question_id": "q1", "image": "IMG", "text": "W?", "options": "ab", "answer": "A"}\n', "options must be a list"),
    (b'["q1", "IMG"]\n', "not a JSON object"),
    (b'{"question_id": "q1", \n', "not JSON"),
    (b"\n\n", "holds no questions"),
    (b'{"question_id": "q1", "image": "IMG", "text": " \\n", "answer": "red"}\n', "text is empty"),
])
def test_a_bad_question_file_is_named_by_its_line(model_dir, scenes_dir, tmp_path, capsys, content, message):
    image = sorted((scenes_dir / "images").glob("test_*.png"))[0].name
    q = tmp_path / "q.jsonl"
    q.write_bytes(content.replace(b"IMG", image.encode()))
    assert _eval(model_dir, q, scenes_dir / "images", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------- options and overrides


@pytest.mark.parametrize("override, message", [
    ("model.compression=bogus", "unknown model.compression 'bogus'"),
    ("optim.bf16=maybe", "optim.bf16 must be true or false"),
    ("optim.seed=yes", "optim.seed must be int"),
    ("optim.max_steps=1.5", "optim.max_steps must be an integer"),
    ("data.image_norm=bogus", "unknown data.image_norm 'bogus'"),
    ("data.template=chatml", "unknown data.template 'chatml'"),
    ("model.num_voco=0", "model.num_voco must be at least 1"),
    ("trainable=3", "trainable must be a list of names"),
    ("optim.nesterov=true", "unknown config key optim.'nesterov'"),
    ("optim.learning_rate", "must be key=value"),
])
def test_train_refuses_a_bad_override_before_anything_runs(tmp_path, capsys, override, message):
    assert main(["train", "--config", "tiny", f"output_dir={tmp_path / 'out'}", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    (b"stages:\n  instruct: !!python/object/apply:os.system [touch PWNED]\n", "is not plain YAML (line 2)"),
    (b"optim: {learning_rate: [1e-3\n", "is not plain YAML"),
    (b"- stage\n- instruct\n", "must be a mapping of config keys, not list"),
    (b"stages: [instruct]\n", "'stages:' must map stage names"),
    (b"optim:\n  learning_rate: \xff\xfe\n", "cannot read config file"),
    (None, "cannot read config file"),  # a folder named like a config
], ids=["python tag", "invalid YAML", "a list", "stages a list", "not UTF-8", "a folder"])
def test_a_bad_config_file_is_one_clear_error(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)  # where a tag that ran would leave its file
    config = tmp_path / "bad.yaml"
    config.mkdir() if text is None else config.write_bytes(text)
    assert main(["train", "--config", str(config), f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "PWNED").exists()


def test_an_override_with_a_python_tag_builds_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    override = "optim.seed=!!python/object/apply:os.system [touch PWNED]"
    assert main(["train", "--config", "tiny", f"output_dir={tmp_path / 'out'}", override]) == 2
    assert "is not plain YAML" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("args", [
    ["train", "--config", "tiny", "--method", "voco", "--budget", "0"],
    ["encode-discrete", "--tokenizer", "t", "--images", "i", "--out", "o", "--shard-size", "-3"],
    ["ask", "--model", "m", "--max-new-tokens", "0", "q?"],
    ["bench", "--reps", "0"],
    ["eval", "--model", "m", "--benchmark", "pope", "--questions", "q", "--images", "i", "--out", "o",
     "--batch-size", "0"],
])
def test_a_non_positive_count_is_a_usage_error(args, capsys):
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # typer's box wraps long lines
    assert "greater than or equal to 1" in err


def test_an_out_of_range_pruning_layer_is_refused(model_dir, make_model_dir, scenes_dir, tmp_path, capsys):
    upper = make_model_dir("none")
    assert _eval(upper, scenes_dir / "test" / "open.jsonl", scenes_dir / "images", tmp_path / "o",
                 "--method", "fastv", "--budget", "4", "--option", "layer=99") == 2
    assert "pruning layer 99 is outside 1-31" in capsys.readouterr().err


# ---------------------------------------------------------------------- unwritable output


@pytest.mark.parametrize("command", ["data tokenizer", "train-tokenizer", "reproduce", "eval", "compress", "train"])
def test_an_output_path_that_cannot_be_written_is_one_clear_error(model_dir, scenes_dir, tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"  # below a regular file: every write fails (as read-only folders do for non-root)
    image = sorted((scenes_dir / "images").glob("test_*.png"))[0]
    args = {
        "data tokenizer": ["data", "tokenizer", "--out", str(out)],
        "train-tokenizer": ["train-tokenizer", "--images", str(scenes_dir / "images"), "--out", str(out), "--steps", "1"],
        "reproduce": ["reproduce", "--quick", "--out", str(out)],
        "eval": ["eval", "--model", str(model_dir), "--benchmark", "scenes_open", "--questions",
                 str(scenes_dir / "test" / "open.jsonl"), "--images", str(scenes_dir / "images"), "--out", str(out)],
        "compress": ["compress", "--model", str(model_dir), "--out", str(out), str(image)],
        "train": ["train", "--config", "tiny", "stage=vision", f"output_dir={out}",
                  f"data.scenes={scenes_dir / 'train' / 'scenes.jsonl'}", f"data.images={scenes_dir / 'images'}"],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(blocker) in err and "Traceback" not in err


# ---------------------------------------------------------------------- feature stores


@pytest.mark.parametrize("index, message", [
    ({"weight_map": {"a.png": "../outside.safetensors"}}, "names a shard outside its folder"),
    ({"weight_map": {"a.png": "/etc/passwd"}}, "names a shard outside its folder"),
    ({"weights": {}}, "is not a feature-store index"),
    ([1, 2], "is not a feature-store index"),
])
def test_a_feature_store_index_cannot_point_outside_its_folder(tmp_path, index, message):
    from htc_vlm.vq.store import FeatureStore

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "f.index.json").write_text(json.dumps(index))
    with pytest.raises(HTCError, match=message):
        FeatureStore(tmp_path / "s" / "f.safetensors")
