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
