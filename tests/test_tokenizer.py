"""The offline GPT-2 tokenizer: real GPT-2 ids, round trips, special tokens."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tokenizer_module():
    # Standalone import: works whether or not the ipa_fast package imports cleanly.
    spec = importlib.util.spec_from_file_location("ipa_fast_tokenizer",
                                                  ROOT / "ipa_fast/decoding/tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ipa_fast_tokenizer", mod)
    spec.loader.exec_module(mod)
    return mod


tokmod = _tokenizer_module()


@pytest.fixture(scope="module")
def tok():
    return tokmod.load_gpt2_tokenizer()


# Ids of GPT-2's published vocabulary (encoder.json), as the original tokenizer gives them.
KNOWN = {
    "Hello world": [15496, 995],
    " the": [262],
    " The quick brown fox": [383, 2068, 7586, 21831],
    "It's": [1026, 338],
    "!": [0],
    "<|endoftext|>": [50256],
}


@pytest.mark.parametrize("text,ids", list(KNOWN.items()))
def test_known_gpt2_ids(tok, text, ids):
    assert tok(text, add_special_tokens=False)["input_ids"] == ids


def test_vocab_matches_encoder_json(tok):
    import json

    vocab_file, _ = tokmod.gpt2_vocab_files()
    encoder = json.load(open(vocab_file, encoding="utf-8"))
    assert len(encoder) == tokmod.VOCAB_SIZE == len(tok)
    for t in ["Hello", "Ġworld", "Ġthe", "!", "<|endoftext|>"]:
        assert tok.convert_tokens_to_ids(t) == encoder[t]


@pytest.mark.parametrize("text", [
    "Hello world", "  leading spaces and\ttabs\n\nnewlines ", "naïve café — ünïcödé ✓ 日本語",
    "Write a sentence using the words: dog, park, run.\nThe dog runs in the park.",
    "emoji 🙂 and numbers 3.14159, 1e-9", "",
])
def test_round_trip(tok, text):
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_and_padding(tok):
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == tok.unk_token_id == 50256
    assert tok.padding_side == "left"
    batch = tok(["a", "a b c d"], padding=True)
    assert batch["input_ids"][0][:3] == [50256] * 3  # left-padded
    assert batch["attention_mask"][0] == [0, 0, 0, 1]


def test_cached_and_hash_is_stable(tok):
    assert tokmod.load_gpt2_tokenizer() is tok
    h = tokmod.tokenizer_hash(tok)
    assert len(h) == 64 and h == tokmod.tokenizer_hash()
