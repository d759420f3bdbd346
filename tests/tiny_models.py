"""Tiny random-weight models and a tiny tokenizer for tests (no downloads, ever).

    from tests.tiny_models import make_tiny_pair, make_tiny_tokenizer
    base, adapter, tok = make_tiny_pair(seed=0)                    # GPT-2 base + GPT-2 adapter
    base, adapter, tok = make_tiny_pair(base_arch="llama")         # Llama base + GPT-2 adapter
    base, adapter, tok = make_tiny_pair(n_control_tokens=5)        # adapter has 5 extra input rows

The tokenizer is a byte-level BPE trained on a few sentences (so any string encodes and
decodes exactly), with ``<|endoftext|>`` as eos = bos = pad, ``padding_side="left"``.
Models are float32, in eval mode, on CPU; their vocabulary is ``len(tok)`` unless
``pad_vocab_to`` asks for a padded embedding matrix (as many checkpoints have).
"""
from __future__ import annotations

import contextlib
import functools

import torch

SENTENCES = [
    "the cat sat on the mat and looked at the dog.",
    "a dog runs in the park with a ball.",
    "the quick brown fox jumps over the lazy dog!",
    "people walk to the market to buy fresh bread and apples.",
    "she writes a letter to her friend every sunday morning.",
    "we play music together in the small garden at night.",
    "birds sing in the tall trees when the sun comes up.",
    "he cooks dinner while the children read books.",
    "Hello world, this is a tiny test corpus for ipa_fast.",
    "numbers like 1 2 3 4 5 6 7 8 9 0 appear here too.",
]
EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(vocab_size: int = 320):
    """A fresh ``PreTrainedTokenizerFast`` (byte-level BPE, ``len(tok) <= vocab_size``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        padding_side="left", clean_up_tokenization_spaces=False)
    return tok


def make_tiny_model(arch: str, vocab_size: int, seed: int, *, n_layer: int = 2, d_model: int = 32,
                    n_head: int = 2, eos_token_id: int = 0, max_positions: int = 256):
    """A random-weight causal LM of ``arch`` ("gpt2" or "llama"), float32, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=d_model,
                         n_layer=n_layer, n_head=n_head, bos_token_id=eos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                          num_hidden_layers=n_layer, num_attention_heads=n_head,
                          num_key_value_heads=n_head, max_position_embeddings=max_positions,
                          bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                          pad_token_id=eos_token_id, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    # Random init gives near-uniform logits; scale the output head so distributions are peaked
    # enough for sampling tests to be meaningful (top-p actually filters).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.config._attn_implementation = "eager" if arch == "gpt2" else model.config._attn_implementation
    return model.float().eval()


def make_tiny_pair(vocab_size: int = 320, seed: int = 0, *, base_arch: str = "gpt2",
                   adapter_arch: str = "gpt2", n_control_tokens: int = 0, pad_vocab_to: int | None = None,
                   base_layers: int = 2, adapter_layers: int = 1, d_model: int = 32):
    """``(base, adapter, tokenizer)``: two random-weight causal LMs over one tiny tokenizer.

    ``n_control_tokens`` extra tokens (``<|ctrl_0|>`` ...) are added to the tokenizer as special
    tokens and to the adapter's embedding matrix only (ids >= V, input-only, as Quark's).
    ``pad_vocab_to`` pads both models' embedding matrices beyond the tokenizer's vocabulary.
    """
    tok = make_tiny_tokenizer(vocab_size)
    V = len(tok)
    eos = tok.eos_token_id
    model_vocab = max(V, pad_vocab_to or 0)
    base = make_tiny_model(base_arch, model_vocab, seed, n_layer=base_layers, d_model=d_model,
                           eos_token_id=eos)
    adapter = make_tiny_model(adapter_arch, model_vocab, seed + 1, n_layer=adapter_layers,
                              d_model=d_model, eos_token_id=eos)
    if n_control_tokens and pad_vocab_to:
        raise ValueError("n_control_tokens and pad_vocab_to together would give control tokens pad rows' ids")
    if n_control_tokens:
        ctrl = [f"<|ctrl_{i}|>" for i in range(n_control_tokens)]
        tok.add_tokens(ctrl, special_tokens=True)
        adapter.resize_token_embeddings(model_vocab + n_control_tokens, mean_resizing=False)
        adapter.eval()
    return base, adapter, tok


def control_tokens(tok) -> list[str]:
    """The ``<|ctrl_i|>`` tokens added by ``make_tiny_pair(n_control_tokens=...)``, in id order."""
    added = tok.get_added_vocab()
    return sorted((t for t in added if t.startswith("<|ctrl_")), key=added.get)


def control_token_ids(tok) -> list[int]:
    """Ids of the ``<|ctrl_i|>`` tokens (>= the shared vocabulary V)."""
    return [tok.convert_tokens_to_ids(t) for t in control_tokens(tok)]


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: tiny models gain nothing from more, and on a shared machine
    intra-op threads spin-wait for each other (tests ran 3x slower with 2 threads here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def save_tiny_pair(directory, seed: int = 0):
    """``make_tiny_pair(seed=seed)`` saved as ``<directory>/base`` and ``<directory>/adapter`` (each
    with the tokenizer); returns the two paths."""
    from pathlib import Path

    directory = Path(directory)
    base, adapter, tok = make_tiny_pair(seed=seed)
    for name, model in (("base", base), ("adapter", adapter)):
        model.save_pretrained(directory / name)
        tok.save_pretrained(directory / name)
    return directory / "base", directory / "adapter"

