"""The analyses behind Table 3 (probing) and Figure 3 (attention), the lower bound, the voco resize
and the discrete-only projector's latent order: each checked against what it is meant to compute."""

import pytest
import torch

from htc_vlm import HTCError
from htc_vlm.analysis.attention import voco_attention
from htc_vlm.analysis.probing import fit_probe, representations
from htc_vlm.anchors import DiscreteTokenProjector
from htc_vlm.layout import IMAGE, image_prompt_ids
from htc_vlm.methods import load_for_method

from helpers import images, tiny_config, tiny_model

PREFIX = [5, 6, 7]


class TensorImages:
    """An ImageEncoder stand-in: image ids name rows of fixed tensors."""

    def __init__(self, config, n=6):
        self.pix, self.q = images(config, b=n, seed=4)

    def batch(self, ids):
        rows = [int(i) for i in ids]
        return self.pix[rows], self.q[rows]


def test_fit_probe_separates_what_is_linear_and_not_what_is_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] > 0).long() + 2 * (x[:, 7] > 0).long()  # four classes, linear in two features
    assert fit_probe(x[:300], y[:300], x[300:], y[300:]) >= 0.9
    noise = torch.randint(0, 4, (400,), generator=g)
    assert fit_probe(x[:300], noise[:300], x[300:], noise[300:]) <= 0.4  # chance is 0.25


@pytest.mark.parametrize("compression,with_anchors", [("htc", True), ("voco", False)])
def test_representations_are_the_voco_state_and_the_channel_means(compression, with_anchors):
    model = tiny_model(compression=compression)
    enc = TensorImages(model.config)
    reps = representations(model, enc, ["0", "1", "2", "3"], batch=3)  # two batches
    d = model.config.text_config.hidden_size
    assert set(reps) == {"z_voco", "patches_mean"} | ({"anchors_mean"} if with_anchors else set())
    assert all(r.shape == (4, d) for r in reps.values())
    pix, q = enc.batch(["2"])
    _, out = model.image_prefill(pix, q)
    voco = len(image_prompt_ids(model.config)) - model.config.num_voco
    torch.testing.assert_close(reps["z_voco"][2], out.last_hidden_state[0, voco].float())
    torch.testing.assert_close(reps["patches_mean"][2], model.model.patch_embeddings(pix).mean(1)[0])
    if with_anchors:
        torch.testing.assert_close(reps["anchors_mean"][2], model.model.discrete_anchors(q).mean(1)[0])


def test_voco_attention_is_the_voco_row_over_the_image_block():
    model = tiny_model(compression="htc")
    enc = TensorImages(model.config)
    att = voco_attention(model, enc, ["0", "1", "2"])
    c = model.config
    assert att.shape == (3, c.num_image_tokens)
    # the same numbers by hand: mean over layers and heads of the voco query's row, image columns only
    pix, q = enc.batch(["0", "1", "2"])
    kinds, out = model.image_prefill(pix, q, output_attentions=True)
    voco = kinds.shape[1] - c.num_voco
    by_hand = torch.stack([a[:, :, voco] for a in out.attentions]).float().mean(dim=(0, 2))  # (M, T)
    torch.testing.assert_close(att, by_hand[:, kinds[0] == IMAGE])
    # voco sees the whole block and itself (and the prefix, here empty): the block takes most of its attention
    assert bool((att.sum(1) <= 1 + 1e-5).all()) and bool((att.sum(1) > 0.5).all())


def test_the_lower_bound_is_the_upper_bound_under_the_voco_mask(tmp_path):
    upper = tiny_model(compression="none")
    upper.save_pretrained(tmp_path / "upper")
    lower = load_for_method(tmp_path / "upper", "lower")
    assert lower.config.compression == "voco" and lower.config.num_voco == 1
    ours = lower.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in upper.state_dict().items())  # no weight changed
    pix, _ = images(upper.config, b=2)
    assert upper.compress(pix, prefix_ids=PREFIX).length == len(PREFIX) + upper.config.num_patches
    assert lower.compress(pix, prefix_ids=PREFIX).length == len(PREFIX) + 1  # only voco is kept
    with pytest.raises(HTCError, match="defined for one voco token"):
        load_for_method(tmp_path / "upper", "lower", budget=2)
    tiny_model(compression="voco").save_pretrained(tmp_path / "voco")
    with pytest.raises(HTCError, match="needs the uncompressed upper-bound model"):
        load_for_method(tmp_path / "voco", "lower")


def test_resize_voco_copies_the_mean_and_keeps_that_many_in_the_cache():
    model = tiny_model(compression="voco", num_voco=2)
    with torch.no_grad():
        model.model.voco_embeddings.weight[1] += 1.0
    mean = model.model.voco_embeddings.weight.detach().mean(0)
    model.resize_voco(3)
    w = model.model.voco_embeddings.weight
    assert model.config.num_voco == 3 and w.shape[0] == 3
    assert all(torch.equal(row, mean) for row in w.detach())
    pix, _ = images(model.config, b=1)
    assert model.compress(pix, prefix_ids=PREFIX).length == len(PREFIX) + 3
    ids = image_prompt_ids(model.config, PREFIX)
    assert ids.count(model.config.voco_token_id) == 3
    before = w.detach().clone()
    model.resize_voco(3)  # same count: nothing changes
    assert torch.equal(model.model.voco_embeddings.weight, before)
    with pytest.raises(HTCError, match="num_voco must be at least 1"):
        model.resize_voco(0)


def test_the_discrete_projector_reads_q_as_channels_then_grid():
    """q is MGVQ's (C, h, w) latent flattened: token p is the MLP of the C values at grid position p."""
    c = tiny_config(compression="discrete")
    proj = DiscreteTokenProjector(c)
    C, P = c.discrete_channels, c.discrete_grid ** 2
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, C, c.discrete_grid, c.discrete_grid, generator=g)  # (B, C, h, w)
    out = proj(latent.flatten(1))  # (B, P, D)
    assert out.shape == (2, P, c.text_config.hidden_size)
    for p in (0, 1, P - 1):
        i, j = divmod(p, c.discrete_grid)
        torch.testing.assert_close(out[:, p], proj.linear_2(proj.act(proj.linear_1(latent[:, :, i, j]))))
    # read as (h, w, C) instead, the tokens would differ: the order is not a matter of taste
    wrong = proj(latent.permute(0, 2, 3, 1).flatten(1))
    assert not torch.allclose(wrong, out)
