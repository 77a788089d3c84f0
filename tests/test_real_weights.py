"""Day one with real weights (issue #15): published checkpoint layouts, the inputs LLaVA-1.5 was
trained on, and the image processor saved with every model. Every checkpoint here is a tiny random
one written in the published layout (tests/layouts.py) and read by the public commands."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_config
from layouts import llama_tokenizer, write_clip, write_images, write_llava_hf, write_original_llava
from PIL import Image
from transformers import AutoTokenizer, CLIPVisionModel, LlavaForConditionalGeneration

from htc_vlm import HTCError, HTCForConditionalGeneration
from htc_vlm.cli import main
from htc_vlm.data.images import CLIP_MEAN, CLIP_STD
from htc_vlm.data.llava import IGNORE, PromptBuilder, get_template
from htc_vlm.data.processor import ImageProcessing
from htc_vlm.data.tokenizer import add_htc_tokens
from htc_vlm.layout import image_prompt_ids


# ---------------------------------------------------------------------- image preprocessing


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_crop_is_what_transformers_clip_processor_does():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    ours = ImageProcessing(56, "crop", CLIP_MEAN, CLIP_STD)
    for w, h in ((80, 56), (56, 91), (200, 120)):
        img = _image(w, h)
        torch.testing.assert_close(ours.pixels([img]), ref(img, return_tensors="pt")["pixel_values"])


def test_pad_is_llava_expand2square_then_the_clip_processor():
    """llava/mm_utils.py expand2square: paste the image centred on a square of the mean colour
    (int(x * 255) per channel), then CLIPImageProcessor (resize, crop, normalise)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    ours = ImageProcessing(56, "pad", CLIP_MEAN, CLIP_STD)
    for w, h in ((80, 50), (40, 91)):
        img = _image(w, h, seed=1)
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        torch.testing.assert_close(ours.pixels([img]), clip(square, return_tensors="pt")["pixel_values"])
    # the padding shows: the top rows of a wide image are the mean colour, i.e. 0 after normalisation
    assert ours.pixels([_image(80, 40)])[0, :, 0].abs().max() < 0.02  # int(mean * 255): within 1/255


def test_exact_refuses_and_reads_back_and_the_file_is_checked(tmp_path):
    exact = ImageProcessing.named(48)
    with pytest.raises(HTCError, match="40x48 but 48x48"):
        exact.pixels([_image(40, 48)])
    assert exact.squashing().pixels([_image(40, 48)]).shape == (1, 3, 48, 48)
    for p in (exact, ImageProcessing(48, "pad", CLIP_MEAN, CLIP_STD), ImageProcessing(48, "resize")):
        p.save(tmp_path)
        assert ImageProcessing.load(tmp_path, 48) == p
    bad = {"image_processor_type": "SiglipImageProcessor"}, {"resample": 2}, {"crop_size": 64, "do_center_crop": True}
    for d, msg in zip(bad, ("SiglipImageProcessor", "resample=2", "64x64 images")):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
        with pytest.raises(HTCError, match=msg):
            ImageProcessing.load(tmp_path, 48)


# ---------------------------------------------------------------------- the vicuna_v1 template


def test_vicuna_v1_two_turn_ids_and_labels_follow_llava():
    """A LLaVA-665k record with two turns, against llava/conversation.py (conv_vicuna_v1, sep " ",
    sep2 "</s>"), tokenizer_image_token (the text tokenized in two pieces around <image>) and
    preprocess_v1's masking (labels on each answer and its </s>), written out by hand."""
    tok = llama_tokenizer()
    add_htc_tokens(tok)
    config = tiny_config(image_token_id=tok.convert_tokens_to_ids("<image>"),
                         voco_token_id=tok.convert_tokens_to_ids("<voco>"), compression="voco")
    record = [{"from": "human", "value": "What colour is the ball?\n<image>"}, {"from": "gpt", "value": "red"},
              {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "left"}]
    ids, labels = PromptBuilder(tok, get_template("vicuna_v1"), config).conversation(record, True, "r")
    system = ("▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant . ▁The "
              "▁assistant ▁gives ▁helpful , ▁detailed , ▁and ▁polite ▁answers ▁to ▁the ▁user 's ▁questions .").split()
    head = ["<s>", *system, "▁USER", ":", "▁"]  # "... questions. USER: " then <image>
    turn1 = ["▁", "<0x0A>", "What", "▁colour", "▁is", "▁the", "▁ball", "?", "▁ASSISTANT", ":"]  # "\nWhat colour ...? ASSISTANT:"
    ans1 = ["▁red", "</s>"]
    turn2 = ["USER", ":", "▁Where", "▁is", "▁it", "?", "▁ASSISTANT", ":"]  # after </s>: no "▁" before USER
    ans2 = ["▁left", "</s>"]
    block = image_prompt_ids(config, [])  # the image placeholders and voco, where <image> was
    want = tok.convert_tokens_to_ids(head) + block + tok.convert_tokens_to_ids(turn1 + ans1 + turn2 + ans2)
    assert ids == want
    n = len(head) + len(block)
    want_labels = [IGNORE] * (n + len(turn1)) + want[n + len(turn1):n + len(turn1) + 2] + [IGNORE] * len(turn2) + want[-2:]
    assert labels == want_labels
    # the inference prompt of the first question is the training prefix, token for token
    builder = PromptBuilder(tok, get_template("vicuna_v1"), config)
    assert builder.prompt_ids("What colour is the ball?") == want[:n + len(turn1)]
    assert builder.question_ids("Where is it?", first=False) == tok.convert_tokens_to_ids(turn2)


# ---------------------------------------------------------------------- llava-hf checkpoints


def _htc_tokenizer(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    assert add_htc_tokens(tok) == ["<voco>"]
    return tok


def test_a_llava_hf_folder_loads_unchanged_with_its_processor_and_a_new_voco_token(tmp_path):
    folder = write_llava_hf(tmp_path / "llava-hf")
    assert (folder / "model.safetensors.index.json").exists()
    tok = _htc_tokenizer(folder)
    model = HTCForConditionalGeneration.from_llava(folder, tokenizer=tok, compression="none").eval()
    llava = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    assert model.config.voco_token_id == tok.convert_tokens_to_ids("<voco>") == llava.config.text_config.vocab_size
    assert model.get_input_embeddings().num_embeddings == len(tok)
    p = model.image_processing
    assert (p.aspect, p.norm, p.size) == ("crop", "clip", 56)
    pix = p.pixels([_image(90, 56)])
    ids = torch.tensor([[1, *([llava.config.image_token_id] * 16), 10, 11, 12]])
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pix).logits
        ours = model(input_ids=ids, pixel_values=pix).logits[..., :ref.shape[-1]]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    other = llama_tokenizer()  # another tokenizer: its <image> is not the checkpoint's image_token_id
    other.add_tokens(["<extra>"], special_tokens=True)
    add_htc_tokens(other)
    with pytest.raises(HTCError, match="image_token_id"):
        HTCForConditionalGeneration.from_llava(folder, tokenizer=other)


def _records(images):
    return [{"id": str(i), "image": p.name, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the ball?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "left"}]} for i, p in enumerate(images)]


def test_train_compress_ask_from_a_llava_hf_folder_with_the_7b_preset(tmp_path, capsys):
    """`htc-vlm train --config llava-1.5-7b model.llava=FOLDER`: the tokenizer comes from the folder
    with <voco> added, images of any shape are padded to a square (the preset's LLaVA-1.5 input), and
    the trained model carries both, so compress / ask feed it the same pixels untold."""
    folder = write_llava_hf(tmp_path / "llava-hf")
    imgs = write_images(tmp_path / "images")
    (tmp_path / "data.json").write_text(json.dumps(_records(imgs)))
    out = tmp_path / "run"
    assert main(["train", "--config", "llava-1.5-7b", "stage=compress", f"output_dir={out}", f"model.llava={folder}",
                 "model.init=", "model.vision_tower=", "model.language_model=", "model.compression=voco",
                 "data.tokenizer=", "data.features=", f"data.images={tmp_path / 'images'}",
                 f"data.conversations={tmp_path / 'data.json'}", "data.max_length=256", "optim.bf16=false",
                 "optim.deepspeed=", "optim.max_steps=2", "optim.per_device_train_batch_size=2",
                 "optim.dataloader_num_workers=0", "optim.save_steps=100"]) == 0
    assert "added <voco>" in capsys.readouterr().out
    trained = out / "model"
    model = HTCForConditionalGeneration.from_pretrained(trained)
    assert model.image_processing == ImageProcessing(56, "pad", CLIP_MEAN, CLIP_STD)
    assert json.loads((trained / "preprocessor_config.json").read_text())["do_pad"] is True
    assert AutoTokenizer.from_pretrained(trained).convert_tokens_to_ids("<voco>") == model.config.voco_token_id
    assert main(["compress", "--model", str(trained), *map(str, imgs), "--out", str(tmp_path / "caches")]) == 0
    cache = sorted((tmp_path / "caches").glob("img0-*.safetensors"))[0]
    assert model.config.chat_template == "vicuna_v1"  # the preset's: compress and ask use it untold
    assert main(["ask", "--model", str(trained), "--cache", str(cache), "What colour is the ball?"]) == 0
    assert "A:" in capsys.readouterr().out


# ---------------------------------------------------------------------- original LLaVA checkpoints


@pytest.mark.parametrize("bin_weights", [False, True])
def test_an_original_llava_checkpoint_converts_and_loads(tmp_path, bin_weights):
    src, llava = write_original_llava(tmp_path / "llava-v1.5", bin_weights=bin_weights)
    clip = write_clip(tmp_path / "clip")
    llava.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(clip).state_dict())  # what it pairs with
    with pytest.raises(HTCError, match="vision_tower"):
        main_convert(src, tmp_path / "x")
    out = tmp_path / "hf"
    assert main(["convert-llava", str(src), "--out", str(out), "--vision-tower", str(clip)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert {"<image>", "<voco>"} <= set(tok.get_vocab())
    model = HTCForConditionalGeneration.from_llava(out, tokenizer=tok, compression="voco")
    assert model.image_processing.aspect == "pad"  # config.json image_aspect_ratio: pad
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    ours = model.state_dict()
    for name, theirs in llava.state_dict().items():  # kept as published (float16); the new token rows appended
        assert torch.equal(ours[name][:theirs.shape[0]].half(), theirs.half()), name
    assert model.dtype == torch.float16
    assert main(["convert-llava", str(src), "--out", str(out), "--vision-tower", str(clip)]) == 2  # not empty


def main_convert(src, out):
    from htc_vlm.convert import convert_llava

    return convert_llava(src, out)


def test_a_folder_that_is_not_llava_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HTCError, match="not an original LLaVA checkpoint"):
        main_convert(tmp_path, tmp_path / "out")
    with pytest.raises(HTCError, match="convert-llava"):
        HTCForConditionalGeneration.from_llava(tmp_path / "nothing", voco_token_id=1)


# ---------------------------------------------------------------------- q of images of any shape


def test_encode_discrete_brings_any_image_to_the_tokenizer_as_the_tower_sees_it(tmp_path):
    """Real images come in every shape: exact refuses them by name; pad (LLaVA-1.5) and crop encode
    each, the padded one's border the mean grey of [-1, 1] (0)."""
    from htc_vlm.vq.model import MultiGroupVQ, VQConfig
    from htc_vlm.vq.store import encode_folder

    torch.manual_seed(0)
    vq = MultiGroupVQ(VQConfig(image_size=48, downsample=4, base_channels=8, codebook_size=16, kmeans_init=False)).eval()
    write_images(tmp_path / "imgs", sizes=((80, 48), (48, 90), (48, 48)))
    feats, failed = encode_folder(vq, tmp_path / "imgs")
    assert sorted(feats) == ["img2.png"] and len(failed) == 2 and "80x48 but 48x48" in " ".join(failed)
    for aspect in ("pad", "crop", "resize"):
        feats, failed = encode_folder(vq, tmp_path / "imgs", aspect=aspect)
        assert not failed and sorted(feats) == ["img0.png", "img1.png", "img2.png"]
    pad = ImageProcessing(48, "pad").pixels([Image.open(tmp_path / "imgs" / "img0.png").convert("RGB")])
    assert pad[0, :, 0].abs().max() < 0.01  # the top rows: padding of the mean colour
    with pytest.raises(HTCError, match="unknown image aspect 'square'"):
        encode_folder(vq, tmp_path / "imgs", aspect="square")
