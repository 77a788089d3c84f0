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
