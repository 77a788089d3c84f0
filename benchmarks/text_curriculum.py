"""Text-only MC and verification records for the tiny lab (docs/LOG.md, session 10), and a check of
whether a model answers them from text alone.

    python benchmarks/text_curriculum.py make RUN_DIR OUT.json [--split train] [--n 2000]
    python benchmarks/text_curriculum.py check RUN_DIR MODEL_DIR... [--n 100]

``make`` writes one record per scene of ``RUN_DIR/scenes/<split>/scenes.jsonl``, with no image: the
scene's caption by shape, then one MC question of each kind and two MME pairs, as separate turns.
Mix them into instruct with, e.g.,
``python -c "import json,sys; json.dump(json.load(open(sys.argv[1])) + json.load(open(sys.argv[2])), open(sys.argv[3], 'w'))" RUN/scenes/train/conversations.json OUT.json MIXED.json``
and ``htc-vlm train --config tiny stage=instruct data.conversations=MIXED.json ...``.

``check`` builds the same records from the validation scenes and asks each model the first turn
(caption + question, no image). It prints how often the next-token argmax is the answer, for MC
(chance 25%) and for verification (chance 50%).
"""

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer

from htc_vlm import HTCForConditionalGeneration
from htc_vlm.data.llava import IGNORE, PromptBuilder, get_template
from htc_vlm.data.scenes import LETTERS, MC_KINDS, MME_SUBTASKS, Scene, _mc_question, _mme_pair, read_jsonl


def text_records(scenes_file: Path, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"text-records/{seed}")
    records = []
    for row in read_jsonl(scenes_file)[:n]:
        scene = Scene.from_json(row)
        questions = [_mc_question(scene, rng, kind) for kind in MC_KINDS]
        for sub in rng.sample(MME_SUBTASKS, 2):
            questions += _mme_pair(scene, rng, sub)
        rng.shuffle(questions)
        turns = []
        for j, q in enumerate(questions):
            text = f"{scene.shape_caption()}\n{q['text']}" if j == 0 else q["text"]
            turns += [{"from": "human", "value": text}, {"from": "gpt", "value": q["answer"]}]
        records.append({"id": f"{row['id']}-text", "conversations": turns})
    return records


@torch.no_grad()
def check(model_dir: Path, records: list[dict]) -> dict[str, tuple[int, int]]:
    model = HTCForConditionalGeneration.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    builder = PromptBuilder(tok, get_template(model.config.chat_template or "plain"), model.config)
    right = {"mc": [0, 0], "verification": [0, 0]}
    for rec in records:
        question, answer = rec["conversations"][0], rec["conversations"][1]["value"]
        ids, labels = builder.conversation([question, {"from": "gpt", "value": answer}], False, rec["id"])
        start = next(i for i, label in enumerate(labels) if label != IGNORE)  # the answer's first token
        logits = model(input_ids=torch.tensor([ids[:start]])).logits[0, -1]
        predicted = tok.decode([int(logits.argmax())]).strip().lower()
        kind = "mc" if answer in LETTERS else "verification"
        right[kind][0] += predicted == answer.lower()
        right[kind][1] += 1
    return {k: (v[0], v[1]) for k, v in right.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("run", type=Path)
    mk.add_argument("out", type=Path)
    mk.add_argument("--split", default="train")
    mk.add_argument("--n", type=int, default=2000)
    ck = sub.add_parser("check")
    ck.add_argument("run", type=Path)
    ck.add_argument("models", type=Path, nargs="+")
    ck.add_argument("--n", type=int, default=100)
    a = ap.parse_args()
    if a.command == "make":
        recs = text_records(a.run / "scenes" / a.split / "scenes.jsonl", a.n)
        a.out.write_text(json.dumps(recs))
        print(f"{len(recs)} text records -> {a.out}")
    else:
        recs = text_records(a.run / "scenes" / "val" / "scenes.jsonl", a.n)
        for m in a.models:
            scores = check(m, recs)
            print(m, "  ".join(f"{k} {r}/{n} ({100 * r / n:.0f}%)" for k, (r, n) in scores.items()))
