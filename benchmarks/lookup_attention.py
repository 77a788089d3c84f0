"""Does an uncompressed model find the object a question names? Per language-model layer, where the
answer position of "What color is the <shape>?" looks among the image tokens, on test scenes with
3-4 objects (one object per patch in the tiny preset):

    python benchmarks/lookup_attention.py RUN_DIR MODEL_DIR [--n 100]

prints, per layer, how often the head-averaged attention's argmax over the patch tokens is the
named object's patch, and the attention share that patch gets (1 / patches if uniform).
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from htc_vlm import HTCForConditionalGeneration
from htc_vlm.data.llava import PromptBuilder, get_template
from htc_vlm.data.scenes import GRID, read_jsonl
from htc_vlm.inference import ImageEncoder

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a reproduce run folder (its scenes/ are used)")
    ap.add_argument("model", type=Path, help="an uncompressed model folder, e.g. RUN/instruct/model")
    ap.add_argument("--n", type=int, default=100)
    a = ap.parse_args()
    model = HTCForConditionalGeneration.from_pretrained(a.model).eval()
    model.set_attn_implementation("eager")  # eager attention returns the weights
    if model.config.compresses or model.config.num_image_tokens != GRID * GRID:
        raise SystemExit(f"needs an uncompressed model with one token per grid cell ({GRID * GRID}), "
                         f"got compression={model.config.compression!r}, {model.config.num_image_tokens} tokens")
    builder = PromptBuilder(AutoTokenizer.from_pretrained(a.model), get_template("plain"), model.config)
    encoder = ImageEncoder(model, root=a.run / "scenes" / "images")
    scenes = [s for s in read_jsonl(a.run / "scenes" / "test" / "scenes.jsonl") if len(s["objects"]) >= 3][: a.n]
    layers = model.config.text_config.num_hidden_layers
    hit, share = torch.zeros(layers), torch.zeros(layers)
    with torch.no_grad():
        for s in scenes:
            o = s["objects"][0]
            ids = builder.prompt_ids(f"What color is the {o['shape']}?")
            pixels, _ = encoder.batch([s["image"]])
            out = model(input_ids=torch.tensor([ids]), pixel_values=pixels, output_attentions=True)
            patches = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
            cell = o["row"] * GRID + o["col"]
            for layer, att in enumerate(out.attentions):  # (1, heads, T, T)
                w = att[0, :, -1, patches].mean(0)  # the answer position over the patches, mean of heads
                hit[layer] += float(w.argmax() == cell)
                share[layer] += float(w[cell] / w.sum())
    print(f"{len(scenes)} test scenes with 3-4 objects; uniform share = {1 / GRID ** 2:.2f}")
    for layer in range(layers):
        print(f"layer {layer}: argmax on the named object {hit[layer] / len(scenes):.2f}, "
              f"its share {share[layer] / len(scenes):.2f}")
