import json

import pytest
import torch

from htc_vlm import HTCForConditionalGeneration, VisualCache
from htc_vlm.cli import main
from htc_vlm.efficiency import analytic, bench_config, run_bench


@pytest.fixture(scope="module")
def htc_model_dir(make_model_dir):
    return make_model_dir("htc")


def test_compress_skips_done_and_reports_bad_images(htc_model_dir, tiny_run, tmp_path, capsys):
    imgs = sorted((tiny_run / "scenes" / "images").glob("test_*.png"))[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"no image here")
    args = ["compress", "--model", str(htc_model_dir), "--out", str(tmp_path / "c"),
            "--features", str(tiny_run / "features.safetensors")]
    assert main(args + [str(p) for p in imgs] + [str(bad)]) == 1  # the good ones are written anyway
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "broken.png" in err and "wrote 3 caches" in err
    files = sorted((tmp_path / "c").glob("*.safetensors"))
    assert [f.stem.split("-")[0] for f in files] == [p.stem for p in imgs]
    model = HTCForConditionalGeneration.from_pretrained(htc_model_dir)
    cache = VisualCache.load(files[0], expected_fingerprint=model.fingerprint())
    assert cache.length == 1 + 2  # the template prefix ("USER :") and one voco token
    assert main(args + [str(p) for p in imgs]) == 0
    err = capsys.readouterr().err
    assert "wrote 0 caches" in err and "skipped 3 already there" in err
    # an edited cache is not kept as "already there": it is made again
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0xFF
    files[0].write_bytes(bytes(data))
    assert main(args + [str(imgs[0])]) == 0
    assert "wrote 1 caches" in capsys.readouterr().err
    VisualCache.load(files[0], expected_fingerprint=model.fingerprint())


def test_caches_are_keyed_by_image_content_model_and_template(make_model_dir, tiny_run, tmp_path, capsys):
    """Two images with one file name, an image changed in place, another template: each its own cache."""
    src = sorted((tiny_run / "scenes" / "images").glob("test_*.png"))[:2]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = tmp_path / "a" / "img.png", tmp_path / "b" / "img.png"
    one.write_bytes(src[0].read_bytes())
    two.write_bytes(src[1].read_bytes())
    model_dir = make_model_dir("voco")
    args = ["compress", "--model", str(model_dir), "--out", str(tmp_path / "c")]
    assert main(args + [str(one), str(two)]) == 0
    assert "wrote 2 caches" in capsys.readouterr().err
    caches = {f: VisualCache.load(f) for f in (tmp_path / "c").glob("img-*.safetensors")}
    assert len(caches) == 2
    a, b = caches.values()
    assert not torch.equal(a.keys[-1], b.keys[-1])  # not one image's cache reused for the other (layer 0 sees no image)
    one.write_bytes(src[1].read_bytes())  # changed in place: compressed again, not "already there"
    assert main(args + [str(one)]) == 0
    assert "wrote 0 caches" in capsys.readouterr().err  # same bytes as b/img.png now: that cache
    assert main(args + ["--template", "vicuna_v1", str(one)]) == 0
    assert "wrote 1 caches" in capsys.readouterr().err
    assert len(list((tmp_path / "c").glob("img-*.safetensors"))) == 3
    vicuna = max((tmp_path / "c").glob("img-*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    assert main(["ask", "--model", str(model_dir), "--cache", str(vicuna), "x?"]) == 2  # plain template
    assert "another template's prefix" in capsys.readouterr().err
    assert main(["ask", "--model", str(model_dir), "--cache", str(vicuna), "--template", "vicuna_v1", "x?"]) == 0


def test_ask_from_image_and_from_cache_agree(htc_model_dir, tiny_run, tmp_path, capsys):
    img = sorted((tiny_run / "scenes" / "images").glob("test_*.png"))[0]
    feats = str(tiny_run / "features.safetensors")
    assert main(["compress", "--model", str(htc_model_dir), "--out", str(tmp_path), "--features", feats, str(img)]) == 0
    capsys.readouterr()
    qs = ["What color is the circle?", "How many objects are there?"]
    assert main(["ask", "--model", str(htc_model_dir), "--image", str(img), "--features", feats, *qs]) == 0
    from_image = capsys.readouterr().out
    cache = next(tmp_path.glob(f"{img.stem}-*.safetensors"))
    assert main(["ask", "--model", str(htc_model_dir), "--cache", str(cache), *qs]) == 0
    assert capsys.readouterr().out == from_image and from_image.count("Q: ") == 2
    assert main(["ask", "--model", str(htc_model_dir), *qs]) == 2
    assert "exactly one of --image or --cache" in capsys.readouterr().err
    assert main(["ask", "--model", str(htc_model_dir), "--cache", str(cache), qs[0], "  "]) == 2
    assert "question 2 is empty" in capsys.readouterr().err


def test_a_cache_from_another_model_is_refused(htc_model_dir, tiny_run, tmp_path, capsys):
    img = sorted((tiny_run / "scenes" / "images").glob("test_*.png"))[0]
    assert main(["compress", "--model", str(htc_model_dir), "--out", str(tmp_path), "--features",
                 str(tiny_run / "features.safetensors"), str(img)]) == 0
    other = HTCForConditionalGeneration.from_pretrained(htc_model_dir)
    with torch.no_grad():
        other.lm_head.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other" / f).write_bytes((htc_model_dir / f).read_bytes())
    capsys.readouterr()
    cache = next(tmp_path.glob(f"{img.stem}-*.safetensors"))
    assert main(["ask", "--model", str(tmp_path / "other"), "--cache", str(cache), "x?"]) == 2
    assert "made by another model" in capsys.readouterr().err


def test_bench_measures_side_by_side_and_writes_outputs(tmp_path):
    torch.manual_seed(0)
    model = HTCForConditionalGeneration(bench_config("tiny"))
    r = run_bench(model, question_tokens=5, answer_tokens=3, reps=1, questions_per_image=(1, 4))
    per_token = 2 * 4 * 4 * 32 * 4  # k and v, layers, kv heads, head dim, float32 bytes
    assert r["kv_bytes_per_image"] == {"uncompressed": 36 * per_token, "compressed": per_token, "ratio": 36.0}
    assert set(r["total_seconds"]) == {"1", "4"} and all(v > 0 for v in r["seconds"].values())
    a = r["analytic_llava_1_5_7b"]
    assert a["kv_bytes_uncompressed"] / a["kv_bytes_compressed"] == 576
    assert a["kv_bytes_uncompressed"] == 576 * 2 * 32 * 32 * 128 * 2
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path), "--reps", "1", "--answer-tokens", "2"]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["kv_bytes_per_image"]["ratio"] == 36.0
    assert (tmp_path / "bench.png").exists()


def test_analytic_flops_grow_with_the_prefix():
    c = bench_config("mid")
    a = analytic(c, 20)
    assert a["prefill_flops_uncompressed"] > 20 * a["prefill_flops_from_cache"]
