"""The lmms-eval plugin, offline: requests built by hand (the real task data lives on the hub)."""

from importlib.metadata import entry_points

import pytest
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval")  # the `eval` extra (part of `dev`)


def _instance(kind, args, doc_id=0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_entry_point_resolves_to_the_plugin():
    from lmms_eval.models import get_model

    assert "htc_vlm" in {ep.name for ep in entry_points().select(group="lmms_eval.models")}
    from htc_vlm.evaluation.lmms_plugin import HTCLmms

    assert get_model("htc_vlm") is HTCLmms


def test_generate_and_loglikelihood_answer_from_one_cache_per_image(make_model_dir, scenes_dir):
    from htc_vlm.evaluation.lmms_plugin import HTCLmms
    from htc_vlm.inference import ask

    model_dir = make_model_dir("voco")
    lm = HTCLmms.create_from_arg_string(f"pretrained={model_dir},max_new_tokens=4")
    img = Image.open(sorted((scenes_dir / "images").glob("test_*.png"))[0]).convert("RGBA")  # converted, not refused
    lm.task_dict = {"t": {"test": {0: {"image": img}}}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    gens = lm.generate_until([
        _instance("generate_until", ("<image>\nWhat color is the circle?", {"until": ["\n"]}, visual, 0, "t", "test")),
        _instance("generate_until", ("How many objects are there?", {"max_new_tokens": 2}, visual, 0, "t", "test")),
    ])
    assert len(lm._caches) == 1  # one image, compressed once for both requests
    cache = lm._caches[("t", "test", 0)]
    assert gens[0] == ask(lm.model, lm.tok, cache, ["What color is the circle?"], max_new_tokens=4)[0]
    assert gens[1] == ask(lm.model, lm.tok, cache, ["How many objects are there?"], max_new_tokens=2)[0]

    assert gens[0], "the seeded random model answers something (else the greedy check below has nothing to check)"
    first = gens[0].split()[0]
    (lp_greedy, greedy), (lp_other, other) = lm.loglikelihood([
        _instance("loglikelihood", ("What color is the circle?", " " + first, visual, 0, "t", "test")),
        _instance("loglikelihood", ("What color is the circle?", lambda doc: "zzz-not-a-word", visual, 0, "t", "test")),
    ])
    assert lp_greedy <= 0 and greedy and not other  # its own greedy first word is greedy; a non-word is not
    assert lp_other < lp_greedy
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])
