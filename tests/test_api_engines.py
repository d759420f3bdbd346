"""Contract tests of APIBase against real servers' wire formats, replayed from the fixtures in
tests/fixtures/engines/ by a tiny fake server on 127.0.0.1 (see the README there for which are
recorded and which are constructed). The fake answers a completion only when the client's
request carries every recorded field (the request side of the contract); the client must turn
the reply into the right ids and log-probs (the reply side).

The live check (``make test-engines``) starts a real llama-cpp-python server from the cached
engines venv and runs the same client against it; it is skipped unless IPA_FAST_LIVE_ENGINES=1.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from ipa_fast.decoding.api_base import LLAMA_CPP_PYTHON_PIECE, APIBase, APIBaseError, printed_table

from fixtures.engines.live import GGUF, ENGINE_VENV, LlamaCppPythonServer, load_tokenizer
from fixtures.engines.replay import FakeEngine, replay_routes

HERE = Path(__file__).resolve().parent / "fixtures" / "engines"


def _load(name):
    return json.loads((HERE / name).read_text())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _replay(fixture):
    contract = dict(fixture, exchanges=[e for e in fixture["exchanges"] if not e.get("evidence")])
    return FakeEngine(replay_routes(contract))


def _pairs(api, row):
    ids, vals = api.top_k([row])
    return list(zip(ids[0].tolist(), vals[0].tolist()))


# -- llama-cpp-python: recorded ----------------------------------------------------------------------

LCP = "llama_cpp_python.json"
needs_lcp = pytest.mark.skipif(not (HERE / LCP).exists(), reason="llama-cpp-python fixture not recorded")


@needs_lcp
def test_llama_cpp_python_fixture_is_a_recording(tok):
    fx = _load(LCP)
    assert fx["recorded"] and fx["engine_version"] == "0.3.36"
    check = fx["printed_table_check"]
    # the client's printed-string table equals the engine's own detokenize for every id
    assert check["ids"] == len(tok) and check["mismatches"] == []
    assert check["ids_printing_empty"] == len(printed_table(tok, max_piece=LLAMA_CPP_PYTHON_PIECE)[""]) > 1


@needs_lcp
@pytest.mark.parametrize("name", ["plain", "story", "japanese", "chat-end"])
def test_llama_cpp_python_keys_map_to_the_engines_ids(tok, name):
    fx = _load(LCP)
    ex = next(e for e in fx["exchanges"] if e.get("name") == name and not e.get("evidence"))
    truth = dict((i, v) for i, v in fx["truth"][name])
    keys = ex["response"]["body"]["choices"][0]["logprobs"]["top_logprobs"][0]
    table = printed_table(tok, max_piece=LLAMA_CPP_PYTHON_PIECE)
    ambiguous = [k for k in keys if len(table[k]) > 1]
    with _replay(fx) as fake:
        api = APIBase(fake.url, tok, top_logprobs=fx["top_logprobs"], timeout=10, ambiguous="drop")
        assert api.detect_dialect() == "llama-cpp-python"
        got = _pairs(api, ex["row"])
        sent = fake.log[-1][2]
        api.close()
    # one text prompt per request, the end-of-generation tokens biased away, greedy
    assert isinstance(sent["prompt"], str) and sent["temperature"] == 0 and sent["logit_bias"]["2"] == -100
    assert api.dropped == len(ambiguous)
    assert len({i for i, _ in got}) == len(keys) - len(ambiguous)
    for i, v in got:  # every id is the engine's own (computed in-process from the ids), same log-prob
        assert i in truth and truth[i] == pytest.approx(v, abs=1e-5), (i, v)
    # and every key that one id prints was mapped: the client kept all it could
    printed = {i: s for s, ids in table.items() for i in ids}
    top = sorted(truth.items(), key=lambda e: -e[1])[:fx["top_logprobs"]]
    assert {i for i, _ in top if len(table[printed[i]]) == 1} == {i for i, _ in got}


@needs_lcp
def test_llama_cpp_python_ambiguous_key_is_a_clear_error(tok):
    fx = _load(LCP)
    ex = next(e for e in fx["exchanges"] if e.get("name") == "chat-end" and not e.get("evidence"))
    keys = ex["response"]["body"]["choices"][0]["logprobs"]["top_logprobs"][0]
    assert "" in keys  # end-of-text (and any partial-byte token) prints as ""
    top_id = fx["truth"]["chat-end"][0][0]
    assert top_id == tok.eos_token_id  # the engine's top token is end-of-text, its log-prob unchanged by the bias
    assert keys[""] <= fx["truth"]["chat-end"][0][1] + 1e-4
    with _replay(fx) as fake:
        api = APIBase(fake.url, tok, top_logprobs=fx["top_logprobs"], timeout=10)
        with pytest.raises(APIBaseError, match="token '', which is not exactly one token") as ei:
            api.top_k([ex["row"]])
        assert ei.value.url.startswith(fake.url)
        plain = next(e["row"] for e in fx["exchanges"] if e.get("name") == "plain")
        with pytest.raises(APIBaseError, match="token ' ', which is not exactly one token"):
            api.top_k([plain])  # a space and the space + partial-byte tokens all print ' '
        api.ambiguous = "drop"
        got = _pairs(api, ex["row"])
        api.close()
    assert tok.eos_token_id not in [i for i, _ in got]


@needs_lcp
def test_llama_cpp_python_evidence(tok):
    """What the recordings show about the server (why the dialect is what it is)."""
    fx = _load(LCP)
    ev = {e["name"]: e for e in fx["exchanges"] if e.get("evidence") and e.get("name")}
    assert ev["ids-prompt"]["response"]["status"] >= 400          # token-id prompts refused
    assert ev["two-prompts"]["response"]["status"] >= 400         # one prompt per request
    no_bias = ev["chat-end-no-bias"]["response"]["body"]["choices"][0]["logprobs"]
    assert no_bias["top_logprobs"] == []                          # its own sample was end-of-text
    models = next(e for e in fx["exchanges"] if e["request"]["path"] == "/v1/models")["response"]["body"]
    assert models["data"][0]["owned_by"] == "me"
    tokenized = [e for e in fx["exchanges"] if e["request"]["path"] == "/extras/tokenize"]
    assert tokenized and all(e["response"]["body"]["tokens"] == e["row"] for e in tokenized)  # same ids, no BOS


@needs_lcp
def test_llama_cpp_python_rows_go_out_one_per_request(tok):
    fx = _load(LCP)
    rows = [e["row"] for e in fx["exchanges"] if e.get("name") in ("plain", "story") and not e.get("evidence")]
    with _replay(fx) as fake:
        api = APIBase(fake.url, tok, top_logprobs=fx["top_logprobs"], timeout=10, dialect="llama-cpp-python",
                      ambiguous="drop")
        ids, vals = api.top_k(rows)
        api.close()
    assert api.requests == 2 and ids.shape == (2, fx["top_logprobs"])
    assert all(isinstance(b["prompt"], str) for m, _, b in fake.log if m == "POST")


# -- vLLM: constructed from the documented format ------------------------------------------------------

def test_vllm_batched_ids_and_k_plus_one_entries(tok):
    fx = _load("vllm.json")
    ex = next(e for e in fx["exchanges"] if e.get("name") == "batch")
    with _replay(fx) as fake:
        api = APIBase(fake.url + "/v1", tok, top_logprobs=fx["top_logprobs"], timeout=10)
        assert api.detect_dialect() == "vllm" and api.model == ex["request"]["body"]["model"]
        ids, vals = api.top_k(ex["rows"])
        api.close()
    assert api.requests == 1  # all rows in one request, as token ids
    for r, expected in enumerate(fx["expected"]["batch"]):
        assert ids[r].tolist() == [i for i, _ in expected]
        assert vals[r].tolist() == pytest.approx([v for _, v in expected])
    # the sampled token outside the top-K (listed first, lowest) was cut by value, not by position
    assert 3401 not in ids[1].tolist()


# -- llama.cpp's llama-server: constructed from the documented format ---------------------------------

def test_llama_server_uses_ids_not_strings(tok):
    fx = _load("llama_server.json")
    with _replay(fx) as fake:
        api = APIBase(fake.url, tok, top_logprobs=fx["top_logprobs"], timeout=10)
        assert api.detect_dialect() == "llama-server"
        rows = [e["row"] for e in fx["exchanges"] if e.get("row")]
        ids, vals = api.top_k(rows)
        sent = [b for m, _, b in fake.log if m == "POST"]
        api.close()
    assert api.requests == 2 and all(isinstance(b["prompt"][0], int) for b in sent)
    for r, name in enumerate(["plain", "chat-end"]):
        expected = sorted(fx["expected"][name], key=lambda e: -e[1])
        assert ids[r].tolist() == [i for i, _ in expected]
        assert vals[r].tolist() == pytest.approx([v for _, v in expected])
    # end-of-text, a control token and a partial byte token: all exact, by id
    assert {2, 0, 227} <= set(ids[1].tolist())


def test_llama_server_detected_from_props_alone(tok):
    fx = _load("llama_server.json")
    props = next(e for e in fx["exchanges"] if e["request"]["path"] == "/props")
    routes = replay_routes({"exchanges": [props]})
    with FakeEngine(routes) as fake:
        assert APIBase(fake.url, tok, timeout=5).detect_dialect() == "llama-server"


# -- live: a real llama-cpp-python server (make test-engines) -----------------------------------------

live = pytest.mark.skipif(os.environ.get("IPA_FAST_LIVE_ENGINES") != "1",
                          reason="live engine check: make test-engines")


@pytest.mark.engines
@live
def test_live_llama_cpp_python(tok):
    fx = _load(LCP)
    with LlamaCppPythonServer(GGUF, python=ENGINE_VENV / "bin" / "python") as server:
        api = APIBase(server.url, tok, top_logprobs=fx["top_logprobs"], timeout=60, ambiguous="drop")
        assert api.detect_dialect() == "llama-cpp-python"
        for name in ("plain", "story", "japanese", "chat-end"):
            row = next(e["row"] for e in fx["exchanges"] if e.get("name") == name)
            truth = dict((i, v) for i, v in fx["truth"][name])
            for i, v in _pairs(api, row):
                assert i in truth and truth[i] == pytest.approx(v, abs=1e-3), (name, i, v)
        # a few tailored steps end to end (random tiny adapter over the same vocabulary)
        from transformers import GPT2Config, GPT2LMHeadModel

        from ipa_fast.decoding.tailored import TailoredLM
        torch.manual_seed(0)
        adapter = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=16, n_layer=1,
                                             n_head=2)).eval()
        lm = TailoredLM(api, adapter, tok, alpha=0.5)
        out = lm.generate(["The capital of France is"], max_new_tokens=4, top_k=1, eos_token_id=[])
        api.close()
    assert len(out.token_ids[0]) == 4 and api.requests >= 4
