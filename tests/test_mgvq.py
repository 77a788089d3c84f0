"""MGVQ's released tokenizer (issue #15, point 3): codes from MGVQ's encoder become our q exactly as
MGVQ's own ``VectorQuantizer.get_codebook_entry`` decodes them (MKJia/MGVQ,
efficientvit/models/tokenizer/mgvq.py), on a random checkpoint in MGVQ's format."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from htc_vlm import HTCError
from htc_vlm.cli import main
from htc_vlm.vq.store import FeatureStore

G, K, D, GRID = 8, 16, 4, 5  # 8 groups of 4 dims (32 channels), 16 codes per group, a 5 x 5 grid


def _mgvq_get_codebook_entry(weight, indices, shape):
    """MGVQ's decoding, step for step: per group its rows, L2-normalised, looked up with indices
    (B, h*w, G); concatenated on the last dim; reshaped channel-first with ``shape`` (B, C, h, w)."""
    n_e_group = weight.shape[0] // G
    z_q_list = []
    for i in range(G):
        embedding = F.normalize(weight[i * n_e_group:(i + 1) * n_e_group, :], p=2, dim=-1)
        z_q_list.append(embedding[indices[:, :, i]])
    quant = torch.cat(z_q_list, dim=-1)
    quant = quant.reshape(shape[0], shape[2], shape[3], shape[1])
    return quant.permute(0, 3, 1, 2).contiguous()


def test_imported_codes_equal_mgvq_decoding(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(G * K, D)
    torch.save({"state_dict": {"quantize.embedding.weight": weight, "quant_conv.weight": torch.randn(32, 4, 1, 1)}},
               tmp_path / "mgvq.pt")
    codes = torch.randint(0, K, (3, GRID * GRID, G))  # what encode() returns, (B * h * w, G), viewed per image
    save_file({f"img{b}.jpg": codes[b].to(torch.int32).contiguous() for b in range(3)}, tmp_path / "codes.safetensors")
    assert main(["import-mgvq", "--ckpt", str(tmp_path / "mgvq.pt"), "--codes", str(tmp_path / "codes.safetensors"),
                 "--out", str(tmp_path / "q.safetensors"), "--grid", str(GRID)]) == 0
    ref = _mgvq_get_codebook_entry(weight, codes, (3, G * D, GRID, GRID))  # (B, C, h, w)
    store = FeatureStore(tmp_path / "q.safetensors", expected_dim=G * D * GRID * GRID)
    torch.testing.assert_close(store.batch(["img0.jpg", "img1.jpg", "img2.jpg"]), ref.flatten(1))
    # every group vector is a unit vector of its own sub-codebook: channels [4g, 4g + 4) are group g
    q = store["img1.jpg"].reshape(G, D, GRID, GRID)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(G, GRID, GRID))


def test_bad_mgvq_inputs_are_named(tmp_path):
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}}, tmp_path / "other.pt")
    save_file({"a.jpg": torch.zeros(GRID * GRID, G, dtype=torch.int32)}, tmp_path / "codes.safetensors")
    from htc_vlm.vq.mgvq import import_codes

    with pytest.raises(HTCError, match="quantize.embedding.weight"):
        import_codes(tmp_path / "other.pt", tmp_path / "codes.safetensors", tmp_path / "q.safetensors", G, GRID)
    torch.save({"state_dict": {"quantize.embedding.weight": torch.randn(G * K, D)}}, tmp_path / "m.pt")
    with pytest.raises(HTCError, match="a.jpg.*expected \\(16, 8\\)"):
        import_codes(tmp_path / "m.pt", tmp_path / "codes.safetensors", tmp_path / "q.safetensors", G, 4)
    save_file({"a.jpg": torch.full((GRID * GRID, G), K, dtype=torch.int32)}, tmp_path / "big.safetensors")
    with pytest.raises(HTCError, match="outside"):
        import_codes(tmp_path / "m.pt", tmp_path / "big.safetensors", tmp_path / "q.safetensors", G, GRID)
