"""Text-only MC and verification records for the tiny lab (docs/LOG.md, session 10), and a check of
whether a model answers them from text alone.

    python benchmarks/text_curriculum.py make RUN_DIR OUT.json [--split train] [--n 2000]
    python benchmarks/text_curriculum.py check RUN_DIR MODEL_DIR... [--n 100]
    python benchmarks/text_curriculum.py stream [RUN_DIR] [--task mc|verification|lookup|mix] [--steps 1500] \
        [--hidden 128] [--layers 4]
    python benchmarks/text_curriculum.py mc-records RUN_DIR OUT.json [--form letter|content-letter]
    python benchmarks/text_curriculum.py lookups RUN_DIR MODEL_DIR... [--n 400]

``make`` writes one record per scene of ``RUN_DIR/scenes/<split>/scenes.jsonl``, with no image: the
scene's caption by shape, then one MC question of each kind and two MME pairs, as separate turns.
Mix them into instruct with, e.g.,
``python -c "import json,sys; json.dump(json.load(open(sys.argv[1])) + json.load(open(sys.argv[2])), open(sys.argv[3], 'w'))" RUN/scenes/train/conversations.json OUT.json MIXED.json``
and ``htc-vlm train --config tiny stage=instruct data.conversations=MIXED.json ...``.

``check`` builds the same records from the validation scenes and asks each model the first turn
(caption + question, no image). It prints how often the next-token argmax is the answer, for MC
(chance 25%) and for verification (chance 50%).

``stream`` asks whether the tiny language model (the ``tiny`` preset's 4 layers x 128, from scratch)
can learn the task from text at all when data is not the limit: every step is 64 new random scenes,
each written as its caption by shape followed by one question (MC of a random kind, or one question of
an MME pair), and the loss is on the answer token only. Every 250 steps it prints the accuracy on 512
fixed held-out examples (docs/LOG.md, session 11). ``--hidden`` and ``--layers`` change the width
(the MLP stays 3x wide, heads stay 32 wide) and depth of that model (session 12). Without RUN_DIR it
uses the scene tokenizer made afresh, the one ``htc-vlm data scenes`` writes. ``--task lookup`` is
the second half of MC alone: the caption and question are replaced by the answer's text, so the
model only has to find that text among the options and give its letter; ``--task mix`` draws lookup or MC for each
example (session 13).

``mc-records`` writes RUN_DIR's instruct conversations with more MC (docs/LOG.md, session 13): every
MC answer of ``train/conversations.json``, 4 new MC questions per training image (one per kind) and 8
text-only lookup records per image (the answer's text, then the lettered options). ``--form letter``
keeps LLaVA's answer, the letter alone; ``--form content-letter`` answers the option's text, then
its letter ("green B"), which VLMEvalKit's matcher reads as B. Train on it from the run's instruct
model with ``htc-vlm train --config tiny stage=instruct model.init=RUN/instruct/model
data.conversations=OUT.json optim.num_train_epochs=2 ...`` (the other options as in RUN/report.md).

``lookups`` asks each model one text-only lookup per validation scene (the records ``reproduce
--text-lookups`` adds to align, in the run's MC answer form) with the answer fed in, and prints how
often every answer token is the argmax, and how often the letter's token is (a model trained on bare
letters since gets the text wrong but may still find the letter; session 22).
"""

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from htc_vlm import HTCForConditionalGeneration
from htc_vlm.data.llava import IGNORE, PromptBuilder, get_template
from htc_vlm.data.scenes import (IMAGE_TOKEN, LETTERS, MC_KINDS, MME_SUBTASKS, Scene, _mc_question, _mme_pair, lookup_prompt,
                                 lookup_question, mc_answer, read_jsonl, sample_scene, text_lookup_records)
from htc_vlm.data.tokenizer import save_tokenizer
from htc_vlm.presets import build_config


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


def _record(rid: str, human: str, answer: str, image: str | None = None) -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    return rec | ({"image": image} if image else {})


def mc_records(run: Path, form: str) -> list[dict]:
    """RUN's instruct conversations, MC answers in ``form``, plus new MC image and lookup records."""
    answer = lambda letter, text: mc_answer(letter, text, form)  # noqa: E731 -- text: the option's text
    rng = random.Random("exp-mc")  # the draws of session 13's runs
    out, lookups = [], []
    for r in json.loads((run / "scenes" / "train" / "conversations.json").read_text()):
        human, gpt = (t["value"] for t in r["conversations"])
        if len(gpt) == 1 and gpt in LETTERS:  # an MC answer; its options are the prompt's "X. option" lines
            r = _record(r["id"], human, answer(gpt, dict(re.findall(r"^([A-H])[.] (.*)$", human, re.M))[gpt]),
                        r.get("image"))
        out.append(r)
    for row in read_jsonl(run / "scenes" / "train" / "scenes.jsonl"):
        scene = Scene.from_json(row)
        for kind in MC_KINDS:
            q = _mc_question(scene, rng, kind)
            out.append(_record(f"{scene.id}-mc-{kind}", f"{IMAGE_TOKEN}\n{q['text']}",
                               answer(q["answer"], q["answer_text"]), scene.image))
        for j in range(8):
            q = lookup_question(scene, rng)
            lookups.append(_record(f"{scene.id}-lookup-{j}", q["text"], answer(q["answer"], q["answer_text"])))
    out += lookups
    return out


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


@torch.no_grad()
def lookups(run: Path, model_dir: Path, n: int = 400) -> tuple[int, int, int]:
    """(answers right, letters right, asked): text-only lookups on ``n`` validation scenes
    (data.scenes.text_lookup_records, in the run's MC answer form), the answer's tokens fed in. An answer
    is right when every one of its tokens is the argmax, its letter when the letter's token is."""
    model = HTCForConditionalGeneration.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    builder = PromptBuilder(tok, get_template(model.config.chat_template or "plain"), model.config)
    form = json.loads((run / "scenes" / "meta.json").read_text())["mc_form"]
    rng = random.Random("text-lookups-check")
    right = letters = asked = 0
    for row in read_jsonl(run / "scenes" / "val" / "scenes.jsonl")[:n]:
        for rec in text_lookup_records(Scene.from_json(row), rng, 1, form):
            ids, labels = builder.conversation(rec["conversations"], False, rec["id"])
            predicted = model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1)
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            letter = int(tok.convert_tokens_to_ids(rec["conversations"][1]["value"].rsplit(" ", 1)[-1]))
            at = int(torch.nonzero(target == letter)[-1])  # the answer's last token of that id: its letter
            right += bool((predicted[keep] == target[keep]).all())
            letters += int(predicted[at]) == letter
            asked += 1
    return right, letters, asked


def _stream_batch(tok, rng: random.Random, task: str, n: int):
    """n fresh examples: ids (n, L) right-padded, attention mask, the answer's position and token."""
    prompts, answers = [], []
    for _ in range(n):
        scene = sample_scene(rng, "stream", 48)
        kind = rng.choice(("lookup", "mc")) if task == "mix" else task
        if task == "verification":
            q = rng.choice(_mme_pair(scene, rng, rng.choice(MME_SUBTASKS)))
        else:
            q = _mc_question(scene, rng, rng.choice(MC_KINDS))
        text = lookup_prompt(q) if kind == "lookup" else f"{scene.shape_caption()}\n{q['text']}"
        prompts.append(tok(f"{text}\n", add_special_tokens=False)["input_ids"])
        answers.append(tok(q["answer"], add_special_tokens=False)["input_ids"][0])
    ids = torch.full((n, max(map(len, prompts))), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    return ids, mask, torch.tensor([len(p) - 1 for p in prompts]), torch.tensor(answers)


def stream(run: Path | None, task: str, steps: int, lr: float, seed: int, hidden: int | None = None,
           layers: int | None = None) -> None:
    tok = AutoTokenizer.from_pretrained(run / "scenes" / "tokenizer") if run else save_tokenizer(tempfile.mkdtemp())
    torch.manual_seed(seed)
    config = build_config("tiny", tok).text_config  # the tiny preset's language model, alone
    if hidden:
        config.intermediate_size = config.intermediate_size * hidden // config.hidden_size
        config.num_attention_heads = config.num_key_value_heads = hidden // config.head_dim
        config.hidden_size = hidden
    config.num_hidden_layers = layers or config.num_hidden_layers
    model = LlamaForCausalLM(config)
    print(f"{config.num_hidden_layers} layers x {config.hidden_size}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    held_out = _stream_batch(tok, random.Random(f"stream-val/{task}"), task, 512)
    rng = random.Random(f"stream-train/{task}/{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    t0 = time.time()

    def answer_logits(ids, mask, pos):  # (B, V) at the answer's position
        return model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ids)), pos]

    for step in range(1, steps + 1):
        ids, mask, pos, target = _stream_batch(tok, rng, task, 64)
        loss = F.cross_entropy(answer_logits(ids, mask, pos), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad(), sched.step()
        if step % 250 == 0 or step == steps:
            with torch.no_grad():
                right = (answer_logits(*held_out[:3]).argmax(-1) == held_out[3]).float().mean()
            print(f"step {step}: train loss {loss.item():.3f}, held-out {task} accuracy {100 * right:.1f}% "
                  f"(chance {50 if task == 'verification' else 25}%), {time.time() - t0:.0f} s", flush=True)


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
    st = sub.add_parser("stream")
    st.add_argument("run", type=Path, nargs="?")
    st.add_argument("--task", choices=("mc", "verification", "lookup", "mix"), default="mc")
    st.add_argument("--steps", type=int, default=1500)
    st.add_argument("--lr", type=float, default=1e-3)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--hidden", type=int, help="width of the language model (default: the tiny preset's, 128)")
    st.add_argument("--layers", type=int, help="its depth (default: the tiny preset's, 4)")
    lk = sub.add_parser("lookups")
    lk.add_argument("run", type=Path)
    lk.add_argument("models", type=Path, nargs="+")
    lk.add_argument("--n", type=int, default=400)
    mr = sub.add_parser("mc-records")
    mr.add_argument("run", type=Path)
    mr.add_argument("out", type=Path)
    mr.add_argument("--form", choices=("letter", "content-letter"), default="content-letter")
    a = ap.parse_args()
    if a.command == "stream":
        stream(a.run, a.task, a.steps, a.lr, a.seed, a.hidden, a.layers)
    elif a.command == "lookups":
        for m in a.models:
            right, letters, asked = lookups(a.run, m, a.n)
            print(f"{m}: text-only lookups of {asked}: answer right {right} ({100 * right / asked:.1f}%), "
                  f"letter right {letters} ({100 * letters / asked:.1f}%; chance 25%)")
    elif a.command == "mc-records":
        recs = mc_records(a.run, a.form)
        a.out.write_text(json.dumps(recs))
        print(f"{len(recs)} records ({a.form}) -> {a.out}")
    elif a.command == "make":
        recs = text_records(a.run / "scenes" / a.split / "scenes.jsonl", a.n)
        a.out.write_text(json.dumps(recs))
        print(f"{len(recs)} text records -> {a.out}")
    else:
        recs = text_records(a.run / "scenes" / "val" / "scenes.jsonl", a.n)
        for m in a.models:
            scores = check(m, recs)
            print(m, "  ".join(f"{k} {r}/{n} ({100 * r / n:.0f}%)" for k, (r, n) in scores.items()))
