"""The embedded default's tokenizer: a word-level vocabulary of the scene benchmark's text.

Built with the ``tokenizers`` library and saved as a transformers ``PreTrainedTokenizerFast``, so
loading it needs no network. Real-scale users load their LLM's own tokenizer instead.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .scenes import IMAGE_TOKEN, vocabulary_texts

VOCO_TOKEN = "<voco>"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE_TOKEN, VOCO_TOKEN)


def build_tokenizer(texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``texts`` (default: everything the scene benchmark can write).

    Special tokens come first (``<pad>`` = 0) and the words follow in sorted order, so the ids do
    not depend on the order of the texts.
    """
    pre = pre_tokenizers.Whitespace()  # words and runs of punctuation
    words = sorted({w for t in (texts or vocabulary_texts()) for w, _ in pre.pre_tokenize_str(t)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    # No decoder: tokenizers joins word-level tokens with single spaces on decode.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "voco_token": VOCO_TOKEN},
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def save_tokenizer(path: str | Path, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(texts)
    tok.save_pretrained(str(path))
    return tok


def add_htc_tokens(tokenizer) -> list[str]:
    """Make a language model's own tokenizer (Vicuna's, llava-hf's) ready for htc-vlm: ``<image>``
    and ``<voco>`` are added as special tokens where missing, and a tokenizer without a padding token
    pads with ``<unk>`` as LLaVA's v1 training does. Returns what was added (the model's embeddings
    must then grow to ``len(tokenizer)``: ``model.resize_token_embeddings``)."""
    missing = [t for t in (IMAGE_TOKEN, VOCO_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return missing
