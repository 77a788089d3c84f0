"""The MC records of benchmarks/text_curriculum.py (docs/LOG.md, session 13): each answer's letter
names the option whose text it gives, and the letter form keeps LLaVA's bare letter."""

import json
import re

import pytest
from helpers import benchmark_script

from htc_vlm.data.scenes import LETTERS, MC_SUFFIX, write_benchmark

text_curriculum = benchmark_script("text_curriculum")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    (out / "scenes").mkdir()
    write_benchmark(out / "scenes", n_train=12, n_test=2, seed=0, image_size=48, n_val=2)
    return out


def _mc(records):
    return [r for r in records if MC_SUFFIX in r["conversations"][0]["value"]]


def test_content_then_letter_names_the_option_it_answers(run):
    letter_recs, content_recs = (_mc(text_curriculum.mc_records(run, f)) for f in ("letter", "content-letter"))
    assert len(letter_recs) == len(content_recs) == 12 * (1 + 4 + 8)
    for a, b in zip(letter_recs, content_recs):
        human, letter = (t["value"] for t in a["conversations"])
        assert b["conversations"][0]["value"] == human and b.get("image") == a.get("image")
        assert len(letter) == 1 and letter in LETTERS
        options = dict(re.findall(r"^([A-H])[.] (.*)$", human, re.M))
        assert b["conversations"][1]["value"] == f"{options[letter]} {letter}"
    lookups = [r for r in content_recs if "image" not in r]
    assert len(lookups) == 12 * 8
    for r in lookups:  # the answer's text opens the prompt: lookup needs no image
        human, answer = (t["value"] for t in r["conversations"])
        assert human.split("\n")[0] == answer.rsplit(" ", 1)[0]


def test_other_records_are_untouched(run):
    base = json.loads((run / "scenes" / "train" / "conversations.json").read_text())
    recs = text_curriculum.mc_records(run, "content-letter")
    assert [r for r in recs[:len(base)] if not _mc([r])] == [r for r in base if not _mc([r])]


def test_the_lookup_check_scores_the_answer_and_its_letter_apart(tmp_path, monkeypatch):
    """``lookups`` counts an answer right only when each of its tokens is the argmax, and its letter
    by the letter's token alone: a model that copies every next token scores all, one that names
    another letter none, and one that gets the option's text wrong but the letter right only letters."""
    from types import SimpleNamespace

    import torch

    from htc_vlm.data.tokenizer import save_tokenizer
    from htc_vlm.presets import build_config

    (tmp_path / "scenes").mkdir()
    write_benchmark(tmp_path / "scenes", n_train=2, n_test=2, seed=0, image_size=48, n_val=5, mc_form="content-letter")
    tok = save_tokenizer(tmp_path / "tokenizer")
    letter_ids = {tok.convert_tokens_to_ids(x) for x in LETTERS[:4]}
    other = {i: tok.convert_tokens_to_ids(LETTERS[(LETTERS.index(tok.convert_ids_to_tokens(i)) + 1) % 4]) for i in letter_ids}

    class Oracle:  # predicts the next token of the fed-in conversation, changed by ``how``
        def __init__(self, how):
            self.how, self.config = how, build_config("tiny", tok)

        def eval(self):
            return self

        def __call__(self, input_ids):  # (1, L) -> logits (1, L, V)
            guess = [self.how(t) for t in input_ids[0, 1:].tolist()]
            logits = torch.zeros(1, len(guess) + 1, len(tok))
            logits[0, torch.arange(len(guess)), torch.tensor(guess)] = 1.0
            return SimpleNamespace(logits=logits)

    def check(how):
        monkeypatch.setattr(text_curriculum.HTCForConditionalGeneration, "from_pretrained", lambda d: Oracle(how))
        monkeypatch.setattr(text_curriculum.AutoTokenizer, "from_pretrained", lambda d: tok)
        return text_curriculum.lookups(tmp_path, tmp_path / "model", n=5)

    assert check(lambda t: t) == (5, 5, 5)
    assert check(lambda t: other.get(t, t)) == (0, 0, 5)
    assert check(lambda t: t if t in letter_ids else (t + 1) % len(tok)) == (0, 5, 5)
