import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
    """A small generated benchmark shared by the tests that only read it."""
    from htc_vlm.data.scenes import write_benchmark
    from htc_vlm.data.tokenizer import save_tokenizer

    out = tmp_path_factory.mktemp("scenes")
    write_benchmark(out, 60, 20, seed=3, image_size=48, n_val=10)
    save_tokenizer(out / "tokenizer")
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, scenes_dir):
    """A run folder shaped like `htc-vlm reproduce`'s: scenes, a random-init tokenizer's features."""
    import shutil

    from htc_vlm.vq.model import MultiGroupVQ, VQConfig
    from htc_vlm.vq.store import encode_folder, write_store

    root = tmp_path_factory.mktemp("run")
    shutil.copytree(scenes_dir, root / "scenes")
    torch.manual_seed(0)
    vq = MultiGroupVQ(VQConfig(image_size=48, downsample=4, base_channels=8, codebook_size=16, kmeans_init=False)).eval()
    feats, failed = encode_folder(vq, root / "scenes" / "images")
    assert not failed
    write_store(feats, root / "features.safetensors")
    return root


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, scenes_dir):
    """An untrained tiny model of the given compression saved with the embedded tokenizer (answers
    are noise; the plumbing is real)."""
    from transformers import AutoTokenizer

    from htc_vlm import HTCForConditionalGeneration
    from htc_vlm.presets import build_config

    def make(compression: str):
        tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
        torch.manual_seed(0)
        model = HTCForConditionalGeneration(build_config("tiny", tok, compression=compression))
        out = tmp_path_factory.mktemp(compression)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out

    return make


@pytest.fixture(scope="session")
def instructed(tiny_run):
    """vision -> align -> instruct on ``tiny_run``, two steps each, through the CLI."""
    from htc_vlm.cli import main

    from helpers import train_args

    run = tiny_run
    assert main(["train", "--config", "tiny", *train_args(run, "vision", "vision", "optim.max_steps=2")]) == 0
    assert main(["train", "--config", "tiny", *train_args(run, "align", "align", "optim.max_steps=2",
                                                      f"model.vision_tower={run / 'vision' / 'model'}",
                                                      f"data.conversations={run / 'scenes/train/captions.json'}")]) == 0
    assert main(["train", "--config", "tiny", *train_args(run, "instruct", "instruct", "optim.max_steps=2",
                                                      f"model.init={run / 'align' / 'model'}")]) == 0
    return run
