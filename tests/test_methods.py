"""The compression methods of Tables 1-2: registry, token budgets, weights untouched, full-budget
parity with the upper bound, gradients for the trained ones."""

import pytest
import torch

from htc_vlm import HTCForConditionalGeneration
from htc_vlm.cli import main
from htc_vlm.errors import HTCError
from htc_vlm.layout import image_prompt_ids
from htc_vlm.methods import METHODS, get_method, load_for_method, parse_options
from htc_vlm.methods.layerwise import schedule, scaled_layers
from htc_vlm.methods.tome import bipartite_merge, merge_plan

from helpers import images, left_pad, tiny_config, tiny_model

TRAINING_FREE = ["fastv", "pdrop", "sparsevlm", "tome"]
PREFIX, QUESTIONS = [5, 6], [[10, 11, 12, 13], [20, 21]]  # two questions of different lengths


@pytest.fixture(scope="module")
def upper_dir(tmp_path_factory):
    model = tiny_model(text_config=tiny_config().text_config.to_dict() | {"num_hidden_layers": 4},
                       compression="none")
    out = tmp_path_factory.mktemp("upper")
    model.save_pretrained(out)
    return out


def upper_logits(path, pix):
    """Last-position logits of the uncompressed model on [prefix][image][question], left-padded."""
    model = HTCForConditionalGeneration.from_pretrained(path).eval()
    head = image_prompt_ids(model.config, PREFIX)
    ids, mask = left_pad([head + q for q in QUESTIONS])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits[:, -1]


def test_registry_lists_every_method_and_refuses_unknown_names():
    assert {"upper", "lower", "avgpool", "qformer", "voco", "htc", "discrete", *TRAINING_FREE} <= set(METHODS)
    with pytest.raises(HTCError, match="unknown method 'nope'; known: upper"):
        get_method("nope")
    with pytest.raises(HTCError, match="unknown option 'k=1' for method fastv; options: layer"):
        parse_options(get_method("fastv"), ["k=1"])
    assert parse_options(get_method("pdrop"), ["layers=4,8"]) == {"layers": (4, 8)}
    for m in METHODS.values():
        assert m.paper and m.summary and m.kind in ("bound", "trained", "training-free")
        assert (m.train_overrides is not None) == (m.kind == "trained")


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_training_free_full_budget_equals_upper_bound_and_leaves_weights(upper_dir, name):
    pix, _ = images(tiny_config(), b=2)
    before = HTCForConditionalGeneration.from_pretrained(upper_dir).state_dict()
    n = tiny_config().num_patches
    full = load_for_method(upper_dir, name, budget=n)
    got = full.next_token_logits(pix, PREFIX, QUESTIONS)
    torch.testing.assert_close(got, upper_logits(upper_dir, pix), atol=2e-5, rtol=1e-4)
    pruned = load_for_method(upper_dir, name, budget=3)
    assert not torch.allclose(pruned.next_token_logits(pix, PREFIX, QUESTIONS), got, atol=1e-4)
    after = pruned.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm"])
@pytest.mark.parametrize("budget", [1, 5, 11])
def test_layer_pruning_keeps_the_budget(upper_dir, name, budget):
    m = load_for_method(upper_dir, name, budget=budget)
    pix, _ = images(tiny_config(), b=2)
    m.next_token_logits(pix, PREFIX, QUESTIONS)
    n = tiny_config().num_patches
    assert m.kept_counts[0] == n  # the first layer sees everything
    assert m.kept_counts[-1] == budget
    assert all(a >= b for a, b in zip(m.kept_counts, m.kept_counts[1:]))


@pytest.mark.parametrize("budget", [1, 3, 8, 16])
def test_tome_merges_to_the_budget(upper_dir, budget):
    m = load_for_method(upper_dir, "tome", budget=budget)
    pix, _ = images(tiny_config(), b=2)
    assert m.visual_tokens(pix).shape == (2, budget, 64)
    assert sum(merge_plan(16, budget, 2)) == 16 - budget


def test_bipartite_merge_is_a_size_weighted_mean():
    x = torch.tensor([[[0.0, 0], [1, 0], [1, 0.1], [0, 1], [0, 1.1]]])  # CLS then 4 tokens
    size = torch.ones(1, 5, 1)
    first = torch.arange(-1, 4)[None, :, None]
    y, s, f = bipartite_merge(x, x, size, first, 2)
    assert y.shape == (1, 3, 2) and s[0, :, 0].tolist() == [1, 2, 2] and f[0, :, 0].tolist() == [-1, 0, 2]
    torch.testing.assert_close(y[0, 1], torch.tensor([1.0, 0.05]))
    z, s2, _ = bipartite_merge(y, y, s, f, 1)  # merging merged tokens weights them by size
    assert s2[0, 1, 0] == 4
    torch.testing.assert_close(z[0, 1], torch.tensor([0.5, 0.55]))


def test_schedules():
    assert schedule(576, 64, 3) == [277, 133, 64]
    assert scaled_layers((8, 16, 24), 4) == (1, 2, 3)
    assert scaled_layers((2, 6, 15), 4) == (0, 1, 2)


def test_training_free_methods_need_the_upper_bound(tmp_path):
    model = tiny_model(compression="voco")
    model.save_pretrained(tmp_path)
    with pytest.raises(HTCError, match="needs the uncompressed upper-bound model"):
        load_for_method(tmp_path, "fastv", budget=2)
    from htc_vlm.methods.fastv import FastV

    with pytest.raises(HTCError, match="budget must be between 1 and the 16"):
        FastV(tiny_model(compression="none"), 17)


@pytest.mark.parametrize("name,part", [("avgpool", None), ("qformer", "visual_pooler"), ("voco", "voco_embeddings"),
                                       ("htc", "anchor_projector"), ("discrete", "discrete_projector")])
def test_trained_methods_keep_the_budget_and_get_gradients(name, part):
    budget = 2
    overrides = dict(x.split("=", 1) for x in get_method(name).train_overrides(budget))
    model = tiny_model(compression=overrides["model.compression"],
                       **{k.split(".", 1)[1]: int(v) for k, v in overrides.items() if k != "model.compression"})
    pix, q = images(model.config, b=2)
    cache = model.compress(pix, q, prefix_ids=PREFIX)
    assert cache.length == len(PREFIX) + budget  # the visual tokens text can see: the budget
    model.train()
    ids = torch.tensor([image_prompt_ids(model.config, PREFIX) + [10, 11, 12]] * 2)
    labels = ids.clone()
    labels[:, :-2] = -100
    model(input_ids=ids, pixel_values=pix, discrete_latents=q, labels=labels).loss.backward()
    assert name == "discrete" or model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    if part:
        grads = [p.grad for p in getattr(model.model, part).parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trained_loader_checks_the_checkpoint(tmp_path):
    tiny_model(compression="voco", num_voco=2).save_pretrained(tmp_path)
    assert load_for_method(tmp_path, "voco", budget=2).config.num_voco == 2
    with pytest.raises(HTCError, match="trained as compression='voco', not 'htc'"):
        load_for_method(tmp_path, "htc")
    with pytest.raises(HTCError, match="keeps 2 visual tokens"):
        load_for_method(tmp_path, "voco", budget=1)


def test_cli_methods_table_and_train_refuses_training_free(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "tome" in out and "BLIP-2" in out
    assert "[anchors; patches] -> voco" in out  # a summary is text: rich markup would eat its brackets
    assert main(["train", "--config", "tiny", "--method", "fastv"]) == 2
    assert "training-free: nothing to train" in capsys.readouterr().err


def test_cli_eval_runs_a_training_free_method(make_model_dir, scenes_dir, tmp_path):
    model_dir = make_model_dir("none")
    rc = main(["eval", "--model", str(model_dir), "--benchmark", "scenes_open", "--questions",
               str(scenes_dir / "test" / "open.jsonl"), "--images", str(scenes_dir / "images"),
               "--out", str(tmp_path), "--method", "fastv", "--budget", "3", "--option", "layer=2"])
    assert rc == 0
    import json

    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["method"] == "fastv" and "scenes_open" in m["scores"]


def test_new_method_modules_are_initialised_when_loaded_from_the_upper_bound(upper_dir):
    for _ in range(3):  # uninitialised memory would show as NaN, huge or all-zero values
        m = HTCForConditionalGeneration.from_pretrained(upper_dir, compression="qformer")
        for name, p in m.model.visual_pooler.named_parameters():
            assert torch.isfinite(p).all() and p.abs().max() < 10, name
        assert 0.01 < float(m.model.visual_pooler.queries.detach().std()) < 0.04, m.model.visual_pooler.queries
        assert float(m.model.visual_pooler.cross_attention.in_proj_weight.detach().std()) > 0


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_training_free_full_budget_generates_what_generate_does(upper_dir, name):
    """The layer-wise engine's own greedy loop, several tokens long, against transformers' generate
    on the upper bound (issue #17: the loop had only been checked on its first token)."""
    pix, _ = images(tiny_config(), b=2)
    model = HTCForConditionalGeneration.from_pretrained(upper_dir).eval()
    ids, mask = left_pad(QUESTIONS)
    with torch.no_grad():  # [prefix][image] prefilled once (every position kept: compression none), then generate
        cache = model.compress(pix, None, prefix_ids=PREFIX)
        out = model.generate(ids, visual_cache=cache, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    expected = out[:, ids.shape[1]:].tolist()
    full = load_for_method(upper_dir, name, budget=tiny_config().num_patches)
    assert full.generate_answers(pix, PREFIX, QUESTIONS, 6, eos_token_id=-1) == expected


def test_both_kinds_of_model_answer_through_one_interface_with_the_same_answers(upper_dir):
    """The Answerer interface: the upper bound (compress once, answer from the cache) and a
    training-free method at the full budget (image and question together) take the same call, rows
    naming their image, and give the same greedy answers and next-token logits."""
    from htc_vlm.answerer import Answerer

    pix, _ = images(tiny_config(), b=2)
    rows, which = QUESTIONS + [[30, 31, 32]], [1, 0, 1]  # three questions about two images
    upper = HTCForConditionalGeneration.from_pretrained(upper_dir).eval()
    full = load_for_method(upper_dir, "fastv", budget=tiny_config().num_patches)
    assert isinstance(upper, Answerer) and isinstance(full, Answerer)
    assert upper.reuses_image_cache and not full.reuses_image_cache
    cached = upper.generate_answers(pix, PREFIX, rows, 5, eos_token_id=-1, image_index=which, batch_size=2)
    assert cached == full.generate_answers(pix, PREFIX, rows, 5, eos_token_id=-1, image_index=which)
    assert cached == full.generate_answers(pix, PREFIX, rows, 5, eos_token_id=-1, image_index=which, batch_size=2)
    assert cached[1] == upper.generate_answers(pix[:1], PREFIX, rows[1:2], 5, eos_token_id=-1)[0]  # row 1: image 0
    torch.testing.assert_close(upper.next_token_logits(pix, PREFIX, rows, image_index=which),
                               full.next_token_logits(pix, PREFIX, rows, image_index=which), atol=2e-5, rtol=1e-4)
