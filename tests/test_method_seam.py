"""The method seam (methods/compression.py): a trained method is one class, and nothing outside
``methods/`` asks which method a model runs."""

import json
import re
from pathlib import Path

import pytest
import torch

import htc_vlm
from htc_vlm import HTCError
from htc_vlm.cli import main
from htc_vlm.layout import image_prompt_ids
from htc_vlm.methods import load_for_method
from htc_vlm.methods.compression import COMPRESSIONS, Compression
from htc_vlm.methods.registry import METHODS, trained_method

from helpers import images, tiny_model, train_args

PREFIX = [5, 6, 7]


class MaxPoolVoco(Compression):
    """Written for this test: the patches max-pooled to one token, then compressed into voco."""

    name = "maxpool_voco"

    def num_image_tokens(self, config):
        return 1

    def image_block(self, model, pixel_values, q):
        return model.patch_embeddings(pixel_values).amax(dim=1, keepdim=True)  # (B, N, D) -> (B, 1, D)


@pytest.fixture
def maxpool_voco():
    method = trained_method(MaxPoolVoco(), tables=(), paper="a test", summary="max over the patches -> voco")
    yield method
    METHODS.pop(method.name)
    COMPRESSIONS.pop(method.name)


def test_a_new_method_is_one_class_for_the_model(maxpool_voco):
    model = tiny_model(compression="maxpool_voco")
    c = model.config
    assert c.num_image_tokens == 1 and c.compresses and not c.needs_latents
    assert image_prompt_ids(c, PREFIX).count(c.image_token_id) == 1
    pix, _ = images(c, b=2)
    cache = model.compress(pix, prefix_ids=PREFIX)
    assert cache.length == len(PREFIX) + c.num_voco  # the voco mask applies: only voco is kept
    # the block is the max over the projected patches, and what voco holds depends on it
    block = model.model.image_block(pix)
    assert torch.equal(block, model.model.patch_embeddings(pix).amax(1, keepdim=True))
    other = model.compress(pix.flip(-1), prefix_ids=PREFIX)
    assert not torch.allclose(cache.keys[-1][:, :, -1], other.keys[-1][:, :, -1])


def test_a_new_method_trains_and_evaluates_through_the_commands(maxpool_voco, instructed, tmp_path):
    run = instructed
    assert main(["train", "--config", "tiny", "--method", "maxpool_voco",
                 *train_args(run, "compress", "c-maxpool", "optim.max_steps=2",
                             f"model.init={run / 'instruct' / 'model'}")]) == 0
    folder = run / "c-maxpool" / "model"
    model = load_for_method(folder, "maxpool_voco", budget=1)
    assert model.config.compression == "maxpool_voco"
    sc = run / "scenes"
    assert main(["eval", "--model", str(folder), "--method", "maxpool_voco", "--benchmark", "scenes_open",
                 "--questions", str(sc / "test" / "open.jsonl"), "--images", str(sc / "images"),
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["method"] == "maxpool_voco" and "scenes_open" in metrics["scores"]
    answered = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(answered) == sum(1 for line in (sc / "test" / "open.jsonl").read_text().splitlines() if line.strip())
    with pytest.raises(HTCError, match="trained as compression='maxpool_voco', not 'voco'"):
        load_for_method(folder, "voco")


def test_an_unknown_compression_lists_the_registered_ones(maxpool_voco):
    with pytest.raises(HTCError, match=r"unknown compression 'bogus'; known: none, .*maxpool_voco"):
        tiny_model(compression="bogus")


def test_no_module_outside_methods_branches_on_a_compression_name():
    """What a method does lives in its file: elsewhere ``config.compression`` is never compared to a name."""
    src = Path(htc_vlm.__file__).parent
    branch = re.compile(r"""compression\s*(==|!=|\bin\b|\bnot in\b)\s*[("'\[]""")
    found = [f"{p.relative_to(src)}:{i}: {line.strip()}" for p in sorted(src.rglob("*.py"))
             if "methods" not in p.relative_to(src).parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, "\n".join(found)
