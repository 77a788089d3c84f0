import json
import os

import pytest
import torch
from PIL import Image

from htc_vlm.cli import main
from htc_vlm.errors import HTCError
from htc_vlm.vq.model import MultiGroupVQ, VQConfig
from htc_vlm.vq.store import FeatureStore, write_store


def _small(**kw):
    return VQConfig(**({"base_channels": 8, "codebook_size": 16, "kmeans_init": False} | kw))


def test_indices_to_codes_reproduce_the_latent_exactly():
    model = MultiGroupVQ(_small()).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    enc = model.encode(x)
    assert torch.equal(model.codes_from_indices(enc.indices), enc.latent)
    assert torch.equal(model.decode_indices(enc.indices), model.decode(enc.latent))
    assert torch.equal(model.q(x), enc.latent.flatten(1))


def test_each_group_uses_its_own_sub_codebook():
    cfg = _small()
    model = MultiGroupVQ(cfg).eval()
    enc = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    book = model.quantizer.codebook  # (G, K, C // G), L2-normalised
    assert book.shape == (cfg.groups, cfg.codebook_size, cfg.latent_channels // cfg.groups)
    torch.testing.assert_close(book.norm(dim=-1), torch.ones(cfg.groups, cfg.codebook_size))
    d = cfg.latent_channels // cfg.groups
    for g in range(cfg.groups):
        got = enc.latent[:, g * d:(g + 1) * d].permute(0, 2, 3, 1)  # (B, h, w, d)
        assert torch.equal(got, book[g][enc.indices[..., g]])
    # the same index means different vectors in different groups
    same = torch.zeros_like(enc.indices)
    codes = model.codes_from_indices(same)
    assert not torch.equal(codes[:, :d], codes[:, d:2 * d])


def test_straight_through_gradients_reach_the_encoder():
    model = MultiGroupVQ(_small()).train()
    _, loss, _, parts = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    parts.reconstruction.backward()  # the reconstruction alone, not the commitment term
    first_conv = model.encoder[0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0 and torch.isfinite(first_conv).all()


@pytest.mark.parametrize("size, down, grid", [(64, 8, 8), (64, 16, 4), (336, 8, 42), (336, 16, 21)])
def test_shapes(size, down, grid):
    cfg = _small(image_size=size, downsample=down)
    model = MultiGroupVQ(cfg).eval()
    enc = model.encode(torch.rand(1, 3, size, size) * 2 - 1)
    assert enc.latent.shape == (1, 32, grid, grid) and enc.indices.shape == (1, grid, grid, 8)
    assert model.q(torch.zeros(1, 3, size, size)).shape == (1, cfg.q_dim) and cfg.q_dim == 32 * grid * grid
    if (size, down) == (336, 16):
        assert cfg.q_dim == 14112
    assert model.decode(enc.latent).shape == (1, 3, size, size)


def test_wrong_image_size_and_bad_configs():
    model = MultiGroupVQ(_small()).eval()
    with pytest.raises(HTCError, match=r"\(B, 3, 64, 64\).*\(1, 3, 32, 32\)"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(HTCError, match="power of two"):
        VQConfig(downsample=6)
    with pytest.raises(HTCError, match="equal groups"):
        VQConfig(latent_channels=30)


def test_feature_store_round_trip_sharded_and_missing_id(tmp_path):
    feats = {f"img_{i}.png": torch.randn(2, 3, 3) for i in range(5)}
    write_store(feats, tmp_path / "one.safetensors")
    write_store(feats, tmp_path / "many.safetensors", shard_size=2)
    assert (tmp_path / "many.index.json").exists() and (tmp_path / "many-00003-of-00003.safetensors").exists()
    for name in ("one.safetensors", "many.safetensors"):
        store = FeatureStore(tmp_path / name, expected_dim=18)
        assert len(store) == 5 and store.dim == 18
        for k, v in feats.items():
            assert torch.equal(store[k], v.reshape(-1))  # (C, h, w) flattened in that order
        assert store.batch(["img_0.png", "img_3.png"]).shape == (2, 18)
        with pytest.raises(HTCError, match="'nope.png' is not in the feature store"):
            store["nope.png"]
    with pytest.raises(HTCError, match="length 18 but the model expects 14112"):
        FeatureStore(tmp_path / "one.safetensors", expected_dim=14112)
    with pytest.raises(HTCError, match="not found"):
        FeatureStore(tmp_path / "none.safetensors")


def test_train_tokenizer_cli_checkpoints_and_resumes(tmp_path, scenes_dir, monkeypatch):
    import htc_vlm.vq.model as vqm

    monkeypatch.setitem(vqm.VQ_PRESETS, "test", _small(image_size=48))
    out = tmp_path / "tok"
    args = ["train-tokenizer", "--images", str(scenes_dir / "images"), "--out", str(out), "--preset", "test",
            "--batch-size", "4", "--eval-every", "2"]
    assert main(args + ["--steps", "2"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert main(args + ["--steps", "4"]) == 0  # resumes at 2
    lines = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4]
    m = lines[-1]
    assert 0 < m["psnr"] < 100 and len(m["usage_per_group"]) == 8 and all(0 < u <= 1 for u in m["usage_per_group"])
    assert (out / "recon_000004.png").exists() and (out / "tokenizer" / "model.safetensors").exists()
    with Image.open(out / "recon_000004.png") as im:
        assert im.size == (8 * 48, 2 * 48)

    # a feature store for every image, readable with the right q length
    store = tmp_path / "q.safetensors"
    assert main(["encode-discrete", "--tokenizer", str(out), "--images", str(scenes_dir / "images"),
                 "--out", str(store)]) == 0
    fs = FeatureStore(store, expected_dim=_small(image_size=48).q_dim)
    assert len(fs) == len(list((scenes_dir / "images").glob("*.png")))
    tok = MultiGroupVQ.load(out / "tokenizer")
    img = Image.open(next((scenes_dir / "images").glob("*.png")))
    from htc_vlm.data.images import to_tensor
    assert torch.equal(fs[img.filename.split("/")[-1]], tok.q(to_tensor(img.convert("RGB"))[None])[0])
    assert main(["encode-discrete", "--tokenizer", str(out), "--images", str(scenes_dir / "images"),
                 "--out", str(store)]) == 2  # exists: nothing overwritten


def test_encode_discrete_converts_grey_and_rgba_and_names_bad_files(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (64, 64), 128).save(folder / "grey.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 100)).save(folder / "rgba.png")
    Image.new("RGB", (32, 32)).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", folder / "link.png")  # inside the folder, pointing out of it
    MultiGroupVQ(_small()).save(tmp_path / "tok")
    assert main(["encode-discrete", "--tokenizer", str(tmp_path / "tok"), "--images", str(folder),
                 "--out", str(tmp_path / "q.safetensors")]) == 1  # the good images written, exit 1
    err = capsys.readouterr().err
    assert "small.png is 32x32 but 64x64" in err and "broken.png" in err and "3 failed" in err
    assert "'link.png' is outside the image folder" in err
    assert FeatureStore(tmp_path / "q.safetensors").ids() == ["grey.png", "rgba.png"]
