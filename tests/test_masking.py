"""The disentanglement mask against matrices written out by hand (Eq. 6)."""

import pytest
import torch

from htc_vlm.layout import IMAGE, PAD, TEXT, VOCO
from htc_vlm.masking import allowed_attention, attention_mask_4d

# [pad] [p] [a1 a2 v1] [z] [t1 t2]: one padding, one prefix token, a 3-token hybrid block, one voco, two text
KINDS = torch.tensor([[PAD, TEXT, IMAGE, IMAGE, IMAGE, VOCO, TEXT, TEXT]], dtype=torch.int8)


def _m(rows):
    return torch.tensor([[c == "x" for c in r.replace(" ", "")] for r in rows])


PLAIN = _m([  # compression off: causal, padding unseen, the pad row sees itself
    "x . . . . . . .",
    ". x . . . . . .",
    ". x x . . . . .",
    ". x x x . . . .",
    ". x x x x . . .",
    ". x x x x x . .",
    ". x x x x x x .",
    ". x x x x x x x",
])
CAUSAL = _m([
    "x . . . . . . .",
    ". x . . . . . .",
    ". x x . . . . .",
    ". x x x . . . .",
    ". x x x x . . .",
    ". x x x x x . .",
    ". x . . . x x .",
    ". x . . . x x x",
])
ISOLATED = _m([
    "x . . . . . . .",
    ". x . . . . . .",
    ". x x . . . . .",
    ". x . x . . . .",
    ". x . . x . . .",
    ". x x x x x . .",
    ". x . . . x x .",
    ". x . . . x x x",
])


@pytest.mark.parametrize("compress, mode, expected", [
    (False, "causal", PLAIN), (False, "isolated", PLAIN), (True, "causal", CAUSAL), (True, "isolated", ISOLATED),
])
def test_mask_matches_written_matrix(compress, mode, expected):
    assert torch.equal(allowed_attention(KINDS, compress, mode)[0], expected)


def test_two_voco_tokens_and_multi_turn_text():
    kinds = torch.tensor([[IMAGE, IMAGE, VOCO, VOCO, TEXT, TEXT, TEXT]], dtype=torch.int8)
    expected = _m([
        "x . . . . . .",
        "x x . . . . .",
        "x x x . . . .",
        "x x x x . . .",
        ". . x x x . .",
        ". . x x x x .",
        ". . x x x x x",
    ])
    assert torch.equal(allowed_attention(kinds, True, "causal")[0], expected)


def test_packed_records_see_the_head_and_themselves_only():
    # [p] [v v] [z] [a1 a2] [b1 b2]: records a and b (segments 1, 2) share the head (segment 0)
    kinds = torch.tensor([[TEXT, IMAGE, IMAGE, VOCO, TEXT, TEXT, TEXT, TEXT]], dtype=torch.int8)
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2]])
    expected = _m([
        "x . . . . . . .",
        "x x . . . . . .",
        "x x x . . . . .",
        "x x x x . . . .",
        "x . . x x . . .",
        "x . . x x x . .",
        "x . . x . . x .",
        "x . . x . . x x",
    ])
    assert torch.equal(allowed_attention(kinds, True, "causal", segments)[0], expected)
    uncompressed = allowed_attention(kinds, False, "causal", segments)[0]
    assert uncompressed[6, :4].all() and not uncompressed[6, 4:6].any()  # b sees the whole head, not a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_float_mask_every_row_has_a_key(dtype):
    m = attention_mask_4d(KINDS.repeat(2, 1), True, "isolated", dtype)
    assert m.shape == (2, 1, 8, 8) and m.dtype == dtype
    assert set(m.unique().tolist()) == {0.0, torch.finfo(dtype).min}
    assert bool((m == 0).any(-1).all())  # no fully masked query row


# ---------------------------------------------------------------------- flex_attention


@pytest.mark.parametrize("mode", ["causal", "isolated"])
def test_the_flex_mask_mod_is_the_same_mask(mode):
    """The GPU BlockMask's mask_mod evaluates the same rule from the (B, T) kinds: evaluated on every
    (query, key) it gives the written matrices, packed segments included."""
    from htc_vlm.masking import mask_mod

    kinds = KINDS.repeat(2, 1)
    b, t = kinds.shape
    grid = torch.arange(b)[:, None, None], 0, torch.arange(t)[None, :, None], torch.arange(t)[None, None, :]
    got = mask_mod(kinds, True, mode)(*grid)
    assert torch.equal(got[0], CAUSAL if mode == "causal" else ISOLATED)
    assert torch.equal(mask_mod(kinds, False, mode)(*grid)[1], PLAIN)
    segments = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 2]]).repeat(2, 1)
    assert torch.equal(mask_mod(kinds, True, mode, segments)(*grid), allowed_attention(kinds, True, mode, segments))


def test_flex_attention_forward_equals_sdpa():
    """attn_implementation="flex_attention": the model passes a BlockMask and gives sdpa's logits
    (forward only: torch has no flex_attention backward on CPU; training with it needs a GPU)."""
    from helpers import images, left_pad, tiny_model

    from htc_vlm.layout import image_prompt_ids

    model = tiny_model(compression="htc", vision_attention="isolated")
    pix, q = images(model.config)
    head = image_prompt_ids(model.config, [3])
    ids, am = left_pad([head + [5, 6, 7, 8], head + [9, 10]])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am).logits
        ref_cache = model.compress(pix, q, prefix_ids=[3])
        model.set_attn_implementation("flex_attention")
        flex = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am).logits
        cache = model.compress(pix, q, prefix_ids=[3])
    real = am.bool()
    torch.testing.assert_close(flex[real], ref[real], atol=1e-5, rtol=1e-5)
    assert cache.length == ref_cache.length == 2  # the prefix token and the voco token
    for name, t in ref_cache._tensors().items():
        torch.testing.assert_close(cache._tensors()[name], t, atol=1e-5, rtol=1e-5)
