from transformers import AutoTokenizer

from htc_vlm.data import scenes as S
from htc_vlm.data.tokenizer import SPECIAL_TOKENS, build_tokenizer


def test_saved_tokenizer_loads_offline_with_special_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for t in ("<image>", "<voco>", "<pad>"):
        assert t in tok.get_vocab()
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    ids = tok("<image>\nWhat color is the circle?")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<image>")
    assert tok.decode(ids, skip_special_tokens=True) == "What color is the circle ?"


def test_every_benchmark_word_is_in_the_vocabulary(scenes_dir):
    tok = AutoTokenizer.from_pretrained(scenes_dir / "tokenizer")
    texts = [q["text"] + " " + q["answer"] for f in S.FAMILIES for q in S.read_jsonl(scenes_dir / "test" / f"{f}.jsonl")]
    for t in texts:
        assert tok.unk_token_id not in tok(t)["input_ids"], t
    # answers round-trip through decode, so generated text can be scored as written
    for answer in (*S.POSITIONS, *S.COLORS, *S.SHAPES, "yes", "3", "B"):
        assert tok.decode(tok(answer)["input_ids"]) == answer


def test_ids_do_not_depend_on_text_order():
    texts = ["a red circle", "is there a blue square ?"]
    assert build_tokenizer(texts).get_vocab() == build_tokenizer(texts[::-1]).get_vocab()
    assert list(build_tokenizer(texts).get_vocab().values()).count(0) == 1
    assert [build_tokenizer(texts).convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
