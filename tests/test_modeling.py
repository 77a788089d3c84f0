import itertools

import pytest
import torch
from helpers import IMAGE_ID, VOCO_ID, images, left_pad, text_config, tiny_config, tiny_model, vision_config
from transformers import LlavaConfig, LlavaForConditionalGeneration

from htc_vlm import HTCError, HTCForConditionalGeneration, VisualCache
from htc_vlm.layout import image_prompt_ids

QUESTIONS = [[5, 6, 7, 8, 9], [10, 11, 12]]  # two questions of different lengths -> left padding


def _full_batch(config, questions=QUESTIONS, prefix=()):
    head = image_prompt_ids(config, list(prefix))
    return left_pad([head + q for q in questions])


# ---------------------------------------------------------------------- parity with transformers' LLaVA


def _tiny_llava(attn):
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=vision_config().to_dict(), text_config=text_config().to_dict(),
                      image_token_id=IMAGE_ID, image_seq_length=16)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.set_attn_implementation(attn)
    return llava


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_compression_matches_llava(attn):
    llava = _tiny_llava(attn)
    model = HTCForConditionalGeneration.from_llava(llava, voco_token_id=VOCO_ID, compression="none").eval()
    model.set_attn_implementation(attn)
    ids, am = _full_batch(model.config)
    pix, _ = images(model.config)
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pix, attention_mask=am).logits
        ours = model(input_ids=ids, pixel_values=pix, attention_mask=am).logits
    real = am.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)


def test_from_llava_keeps_weights_and_adds_new_parts(tmp_path):
    llava = _tiny_llava("sdpa")
    llava.save_pretrained(tmp_path / "llava")
    model = HTCForConditionalGeneration.from_llava(tmp_path / "llava", voco_token_id=VOCO_ID,
                                                   discrete_channels=4, discrete_grid=3)
    theirs = llava.state_dict()
    for name, p in model.state_dict().items():
        if name in theirs:
            assert torch.equal(p, theirs[name]), name
        else:
            assert name.startswith(("model.anchor_projector.", "model.voco_embeddings.")), name
    assert model.config.compression == "htc" and model.config.num_patches == 16


# ---------------------------------------------------------------------- cached answering == full forward


def _cached_vs_full(model, prefix=()):
    pix, q = images(model.config)
    ids, am = _full_batch(model.config, prefix=prefix)
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am).logits
        cache = model.compress(pix, q, prefix_ids=list(prefix))
        qids, qam = left_pad(QUESTIONS)
        cached = model(**model.answer_inputs(cache, qids, qam)).logits
    n = qids.shape[1]
    real = qam.bool()
    return full[:, -n:][real], cached[real], cache


CASES = [
    dict(compression=c, vision_attention=v, num_voco=n)
    for c, v, n in itertools.product(["voco", "htc", "discrete"], ["causal", "isolated"], [1, 3])
] + [dict(compression="htc", fusion=f) for f in ("post", "mean")] + [dict(compression="none")] + [
    dict(compression=c, pool_tokens=k) for c in ("avgpool", "qformer") for k in (1, 3)]  # no voco: the pooled tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_cached_answering_matches_full_masked_forward(attn, options):
    model = tiny_model(attn, **options)
    full, cached, cache = _cached_vs_full(model)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    expected_len = model.config.num_voco if model.config.compresses else model.config.num_image_tokens
    assert cache.length == expected_len


def test_cached_answering_with_a_text_prefix():
    model = tiny_model(compression="htc")
    full, cached, cache = _cached_vs_full(model, prefix=(3, 4))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert cache.length == 2 + 1 and cache.meta["kept_positions"] == [0, 1, 2 + model.config.num_image_tokens]


def test_generate_from_cache_equals_generate_from_pixels_and_greedy_full_forward():
    model = tiny_model(compression="htc")
    pix, q = images(model.config)
    qids, qam = left_pad(QUESTIONS)
    cache = model.compress(pix, q)
    a = model.generate(qids, visual_cache=cache, attention_mask=qam, max_new_tokens=4, do_sample=False)
    b = model.generate(qids, pixel_values=pix, discrete_latents=q, attention_mask=qam, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b) and a.shape == (2, qids.shape[1] + 4)
    # greedy decoding by hand with the full masked forward gives the same tokens
    ids, am = _full_batch(model.config)
    for step in range(4):
        with torch.no_grad():
            nxt = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am).logits[:, -1].argmax(-1)
        assert torch.equal(nxt, a[:, qids.shape[1] + step])
        ids, am = torch.cat([ids, nxt[:, None]], 1), torch.cat([am, torch.ones_like(am[:, :1])], 1)


# ---------------------------------------------------------------------- the image reaches text only through voco


@pytest.mark.parametrize("compression", ["voco", "htc", "discrete"])
def test_text_never_attends_to_image_tokens(compression):
    model = tiny_model("eager", compression=compression, num_voco=2)
    pix, q = images(model.config)
    ids, am = _full_batch(model.config)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am, output_attentions=True)
    img = ids == IMAGE_ID
    text_rows = am.bool() & ~img & (ids != VOCO_ID)
    for layer in out.attentions:  # (B, H, T, T)
        probs_on_image = (layer * img[:, None, None, :]).sum(-1)  # (B, H, T)
        assert probs_on_image.permute(0, 2, 1)[text_rows].abs().max() == 0
        voco_rows = ids == VOCO_ID
        assert probs_on_image.permute(0, 2, 1)[voco_rows].min() > 0  # voco does look at the block


@pytest.mark.parametrize("compression", ["voco", "htc"])
def test_pixels_change_the_cache_and_answers_depend_only_on_it(compression):
    model = tiny_model(compression=compression)
    pix_a, q = images(model.config, seed=1)
    pix_b, _ = images(model.config, seed=2)
    ca, cb = model.compress(pix_a, q), model.compress(pix_b, q)
    assert not torch.allclose(ca.keys[-1], cb.keys[-1])
    qids, qam = left_pad(QUESTIONS)
    ids, am = _full_batch(model.config)
    with torch.no_grad():
        for pix, cache in ((pix_a, ca), (pix_b, cb)):
            full = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am).logits[:, -qids.shape[1]:]
            torch.testing.assert_close(model(**model.answer_inputs(cache, qids, qam)).logits[qam.bool()],
                                       full[qam.bool()], atol=1e-5, rtol=1e-5)
        # a fixed cache with other pixels in the question's batch changes nothing: the question has no pixels
        swapped = model(**model.answer_inputs(ca, qids, qam)).logits
        assert not torch.allclose(swapped, model(**model.answer_inputs(cb, qids, qam)).logits)


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("compression", ["none", "voco", "htc", "discrete"])
def test_every_trainable_parameter_gets_a_gradient(compression):
    model = tiny_model(compression=compression, num_voco=2).train()
    pix, q = images(model.config)
    ids, am = _full_batch(model.config)
    labels = ids.masked_fill((am == 0) | (ids == IMAGE_ID) | (ids == VOCO_ID), -100)
    loss = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0}
    # vision_feature_layer=-2: CLIP's last layer and post-layernorm are unused, as in LLaVA
    unused = {n for n, _ in model.named_parameters()
              if ".encoder.layers.1." in n and "vision_tower" in n or "post_layernorm" in n}
    if compression == "discrete":  # the image is the VQ tokens only: no vision tower, no projector
        unused |= {n for n, _ in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n}
    if compression == "none":  # no voco token in an uncompressed prompt
        unused |= {"model.voco_embeddings.weight"}
    assert no_grad == unused


def test_loss_is_on_answer_tokens_only():
    model = tiny_model(compression="htc")
    pix, q = images(model.config)
    ids, am = _full_batch(model.config)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    out = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am, labels=labels)
    logp = out.logits[:, -3:-1].log_softmax(-1).gather(-1, ids[:, -2:, None])
    torch.testing.assert_close(out.loss, -logp.mean())


# ---------------------------------------------------------------------- persistence


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(compression="htc", num_voco=2, vision_attention="isolated", fusion="post")
    model.save_pretrained(tmp_path)
    again = HTCForConditionalGeneration.from_pretrained(tmp_path).eval()
    def arch(c):  # the config minus run metadata (dtype is recorded on save)
        d = {k: v for k, v in c.to_dict().items() if k not in ("_name_or_path", "dtype")}
        return d | {k: {kk: vv for kk, vv in d[k].items() if kk != "dtype"} for k in ("vision_config", "text_config")}

    assert arch(again.config) == arch(model.config)
    assert again.config.num_image_tokens == model.config.num_image_tokens
    pix, q = images(model.config)
    ids, am = _full_batch(model.config)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am).logits
        b = again(input_ids=ids, pixel_values=pix, discrete_latents=q, attention_mask=am).logits
    assert torch.equal(a, b)
    assert again.fingerprint() == model.fingerprint()


def test_visual_cache_file_round_trip_and_refusals(tmp_path):
    model = tiny_model(compression="htc")
    pix, q = images(model.config)
    cache = model.compress(pix, q)
    cache.save(tmp_path / "c.safetensors")
    back = VisualCache.load(tmp_path / "c.safetensors", expected_fingerprint=model.fingerprint())
    assert all(torch.equal(a, b) for a, b in zip(cache.keys + cache.values, back.keys + back.values))
    assert back.next_position == cache.next_position and back.meta == cache.meta

    other = tiny_model(compression="htc", seed=1)
    with pytest.raises(HTCError, match="another model"):
        VisualCache.load(tmp_path / "c.safetensors", expected_fingerprint=other.fingerprint())
    with pytest.raises(HTCError, match="another model"):
        other.generate(torch.tensor([[5, 6]] * 2), visual_cache=back, max_new_tokens=1)

    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HTCError, match="truncated or corrupt"):
        VisualCache.load(tmp_path / "t.safetensors")
    edited = bytearray(data)
    edited[-3] ^= 0xFF
    (tmp_path / "e.safetensors").write_bytes(bytes(edited))
    with pytest.raises(HTCError, match="modified"):
        VisualCache.load(tmp_path / "e.safetensors")
    with pytest.raises(HTCError, match="cannot read"):
        VisualCache.load(tmp_path / "missing.safetensors")

    # the metadata is under the checksum too: an edited position, or any other field, is refused
    from safetensors import safe_open
    from safetensors.torch import save as st_save

    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for field, value in (("next_position", str(int(meta["next_position"]) + 1)), ("meta", "{}"),
                         ("num_layers", "x"), ("fingerprint", other.fingerprint())):
        (tmp_path / "m.safetensors").write_bytes(st_save(tensors, metadata=meta | {field: value}))
        with pytest.raises(HTCError, match="modified after it was written"):
            VisualCache.load(tmp_path / "m.safetensors")


# ---------------------------------------------------------------------- bad input


def test_bad_inputs_name_expected_and_actual():
    model = tiny_model(compression="htc")
    pix, q = images(model.config)
    ids, am = _full_batch(model.config)
    with pytest.raises(HTCError, match=r"\(B, 3, 56, 56\).*\(2, 3, 64, 64\)"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 64, 64), discrete_latents=q, attention_mask=am)
    with pytest.raises(HTCError, match=r"\(B, 3, 56, 56\).*\(2, 1, 56, 56\)"):
        model(input_ids=ids, pixel_values=pix[:, :1], discrete_latents=q, attention_mask=am)
    with pytest.raises(HTCError, match=r"\(B=2, 36\).*\(2, 35\)"):
        model(input_ids=ids, pixel_values=pix, discrete_latents=q[:, :35], attention_mask=am)
    with pytest.raises(HTCError, match="needs discrete_latents"):
        model(input_ids=ids, pixel_values=pix, attention_mask=am)
    with pytest.raises(HTCError, match="2 image blocks but 1 images"):
        model(input_ids=ids, pixel_values=pix[:1], discrete_latents=q[:1], attention_mask=am)
    short = left_pad([[IMAGE_ID] * 5 + [VOCO_ID, 5]])[0]
    with pytest.raises(HTCError, match="5 <image> placeholders.*block of 20"):
        model(input_ids=short, pixel_values=pix[:1], discrete_latents=q[:1])
    no_voco = left_pad([[IMAGE_ID] * 20 + [5]])[0]
    with pytest.raises(HTCError, match="exactly 1 <voco>"):
        model(input_ids=no_voco, pixel_values=pix[:1], discrete_latents=q[:1])
    cache = model.compress(pix, q)
    with pytest.raises(HTCError, match="2 images but 3 questions"):
        model.answer_inputs(cache, torch.tensor([[5]] * 3))


@pytest.mark.parametrize("bad, message", [
    (dict(compression="zip"), "unknown compression 'zip'"),
    (dict(vision_attention="full"), "unknown vision_attention"),
    (dict(fusion="late"), "unknown fusion"),
    (dict(num_voco=0), "num_voco must be at least 1"),
    (dict(compression="htc", discrete_channels=0), "needs a discrete channel"),
])
def test_bad_config_values(bad, message):
    with pytest.raises(HTCError, match=message):
        tiny_config(**bad)


def test_token_counts_come_from_the_config():
    assert tiny_config(compression="htc").num_image_tokens == 4 + 16
    assert tiny_config(compression="htc", num_anchors=8).num_image_tokens == 8 + 16
    assert tiny_config(compression="htc", fusion="mean").num_image_tokens == 16
    assert tiny_config(compression="voco").num_image_tokens == 16
    assert tiny_config(compression="discrete").num_image_tokens == 9
    paper = tiny_config(vision_config=vision_config().to_dict() | {"image_size": 336}, discrete_channels=32,
                        discrete_grid=21)
    assert paper.num_patches == 576 and paper.discrete_dim == 14112 and paper.num_image_tokens == 580


def test_siglip_tower_without_cls_token():
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=14)
    cfg = tiny_config(vision_config=vision.to_dict(), vision_feature_select_strategy="full", vision_has_cls=False,
                      vision_feature_layer=-1, compression="htc")
    assert cfg.num_patches == 16 and cfg.num_image_tokens == 20
    torch.manual_seed(0)
    model = HTCForConditionalGeneration(cfg).eval()
    full, cached, cache = _cached_vs_full(model)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(HTCError, match="drops a CLS token, but vision_has_cls=False"):
        tiny_config(vision_config=vision.to_dict(), vision_has_cls=False)


def test_the_kv_cache_goes_under_the_name_transformers_takes_without_deprecation_warnings():
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40): the
    model takes either and passes it on under the installed version's name, so compress, a cached
    forward and generate neither warn nor break when the old name is removed."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    model = tiny_model(compression="voco").eval()
    pix, q = images(model.config, b=1)
    ids, mask = left_pad([[10, 11, 12]])
    logged: list[str] = []  # transformers also says it through its logger (once per process: the cache cleared)
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.Logger.warning_once.cache_clear() if hasattr(logging.Logger, "warning_once") else None
    hf_logging.get_logger("transformers").addHandler(handler)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(past_key_values|`cache`).*", category=FutureWarning)
        cache = model.compress(pix, q)
        inputs = model.answer_inputs(cache, ids, mask)
        key = next(k for k in ("cache", "past_key_values") if k in inputs)
        by_name = model(**inputs).logits
        other = "past_key_values" if key == "cache" else "cache"
        renamed = model(**{k: v for k, v in inputs.items() if k != key}, **{other: cache.to_dynamic_cache()}).logits
        out = model.generate(ids, visual_cache=cache, attention_mask=mask, max_new_tokens=3, do_sample=False)
    hf_logging.get_logger("transformers").removeHandler(handler)
    assert not [m for m in logged if "past_key_values" in m], logged
    torch.testing.assert_close(by_name, renamed)
    assert out.shape == (1, 6)
