"""API-only bases: a real HTTP server on 127.0.0.1 (ipa_fast.decoding.serve, tiny model, top-k
log-probs) against the in-process sparse-base path; key mapping; dialect detection; faults
(hang, drip-feed, 5xx, reset, truncated body, bad status line, malformed JSON, wrong entry
count) give an APIBaseError within the deadline (+ retries), never a hang."""
import json
import time

import pytest
import torch

from ipa_fast.decoding.api_base import APIBase, APIBaseError, completions_url
from ipa_fast.decoding.tailored import TailoredLM
from ipa_fast.decoding.serve import CompletionServer

from fixtures.engines.replay import (FakeEngine, bad_status, drip, hang, json_reply, raw_reply, reset,
                                     truncate)

PROMPTS = ["the cat", "a dog runs in the park with", "Hello"]
K = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(pair):
    base, _, tok = pair
    with CompletionServer(base, tok, max_logprobs=K) as s:
        yield s


def test_api_base_agrees_with_in_process_sparse_base(pair, server):
    base, adapter, tok = pair
    api = APIBase(server.url, tok, top_logprobs=K, timeout=30)
    over_http = TailoredLM(api, adapter, tok)
    in_process = TailoredLM(base, adapter, tok, base_top_k=K)
    kw = dict(top_p=0.95, seed=[3, 4, 5], eos_token_id=[])
    a = over_http.generate(PROMPTS, [6, 3, 6], **kw)
    b = in_process.generate(PROMPTS, [6, 3, 6], **kw)
    assert a.token_ids == b.token_ids
    for r in range(3):
        torch.testing.assert_close(torch.tensor(a.logprobs[r]), torch.tensor(b.logprobs[r]), atol=1e-4, rtol=0)
    # one request per step for the whole batch; the server saw ids, never re-tokenised text
    assert api.requests == 6
    # the tailored policy lives inside the base's top-k: every token is in it
    with torch.no_grad():
        for r, p in enumerate(b.prompt_token_ids):
            ids = p + b.token_ids[r][:-1]
            lp = torch.log_softmax(base(torch.tensor([ids])).logits[0, len(p) - 1:, :in_process.V], -1)
            top = lp.topk(K, dim=-1).indices
            assert all(t in top[i].tolist() for i, t in enumerate(b.token_ids[r]))


def test_one_request_per_row_mode(pair, server):
    base, adapter, tok = pair
    api = APIBase(server.url, tok, top_logprobs=K, batch=False)
    a = TailoredLM(api, adapter, tok).generate(PROMPTS[:2], 3, seed=1, eos_token_id=[])
    b = TailoredLM(base, adapter, tok, base_top_k=K).generate(PROMPTS[:2], 3, seed=1, eos_token_id=[])
    assert a.token_ids == b.token_ids
    assert api.requests == 3 * 2


def test_string_keys_map_to_ids(pair, server):
    _, _, tok = pair
    api = APIBase(server.url, tok, top_logprobs=K)
    the = tok(" the")["input_ids"]
    assert len(the) == 1
    assert api.key_to_id(" the") == the[0]          # decoded form, as servers print it
    assert api.key_to_id("token_id:5") == 5
    with pytest.raises(APIBaseError, match="not exactly one token"):
        api.key_to_id("\ufffd")                      # many byte tokens decode to it: ambiguous
    with pytest.raises(APIBaseError, match="outside the shared vocabulary"):
        api.key_to_id(f"token_id:{len(tok) + 5}")


def test_server_answers_openai_shape(server, pair):
    tok = pair[2]
    api = APIBase(server.url, tok, top_logprobs=3)
    reply = api._post({"prompt": "the cat", "max_tokens": 2, "logprobs": 3, "temperature": 0})
    ch = reply["choices"][0]
    assert len(ch["logprobs"]["top_logprobs"]) == 2 and len(ch["logprobs"]["top_logprobs"][0]) == 3
    with pytest.raises(APIBaseError, match="HTTP 400"):
        api._post({"prompt": "x", "max_tokens": 1, "logprobs": 99})


def test_server_down_is_a_clear_error(pair):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    api = APIBase(f"http://127.0.0.1:{port}", pair[2], timeout=2)
    with pytest.raises(APIBaseError, match="cannot reach"):
        api.top_k([[1, 2, 3]])


class _Fake(FakeEngine):
    """Answers every completion with a fixed body (or hangs)."""

    def __init__(self, body: bytes, delay: float = 0.0):
        super().__init__({("POST", "/v1/completions"): [hang() if delay else raw_reply(200, body)]})


@pytest.mark.parametrize("body,match", [
    (b"this is not json", "malformed JSON"),
    (json.dumps({"choices": [{"index": 0, "text": "x"}]}).encode(), "top_logprobs"),
    (json.dumps({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"zz-unknown-zz": -0.1}]}}]}).encode(),
     "ids are not guessed"),
    (json.dumps({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:3": "high"}]}}]}).encode(),
     "bad log-prob"),
])
def test_malformed_replies_are_clear_errors(pair, body, match):
    fake = _Fake(body)
    try:
        with pytest.raises(APIBaseError, match=match):
            APIBase(fake.url, pair[2], timeout=5, dialect="vllm").top_k([[1, 2]])
    finally:
        fake.close()


def test_slow_server_times_out(pair):
    fake = _Fake(b"{}", delay=3.0)
    try:
        t0 = time.time()
        with pytest.raises(APIBaseError, match="timed out"):
            APIBase(fake.url, pair[2], timeout=0.5, dialect="vllm").top_k([[1, 2]])
        assert time.time() - t0 < 2.5
    finally:
        fake.close()


def test_completions_url_forms():
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"


def test_short_reply_densifies_to_its_entries_only(pair):
    reply = {"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:3": -0.5, "token_id:0": -1.0}]}}]}
    fake = _Fake(json.dumps(reply).encode())
    try:
        api = APIBase(fake.url, pair[2], top_logprobs=K, timeout=5, dialect="vllm")
        dense = api.prefill([[1, 2]], 1)
    finally:
        fake.close()
    assert dense[0, 3] == -0.5 and dense[0, 0] == -1.0
    assert torch.isinf(dense[0]).sum() == dense.shape[1] - 2


# -- faults: every one an APIBaseError carrying the URL, within the deadline ------------------------

def _ok(n=1, k=3):
    return {"choices": [{"index": i, "logprobs": {"top_logprobs": [
        {f"token_id:{j}": -0.5 - j for j in range(k)}]}} for i in range(n)]}


def _timed(api, rows=([1, 2],)):
    t0 = time.monotonic()
    with pytest.raises(APIBaseError) as ei:
        api.top_k([list(r) for r in rows])
    return ei.value, time.monotonic() - t0


@pytest.mark.parametrize("action,match", [
    (hang(), "timed out"),
    (drip(_ok(), every=0.15), "timed out"),          # bytes keep coming: a per-read timeout never fires
])
def test_hang_and_drip_feed_hit_the_deadline(pair, action, match):
    with FakeEngine({("POST", "/v1/completions"): [action]}) as fake:
        api = APIBase(fake.url, pair[2], top_logprobs=3, timeout=0.8, dialect="vllm")
        err, took = _timed(api)
        api.close()
    assert match in str(err) and err.url.startswith(fake.url) and err.cause == "timeout"
    assert took < 1.5


@pytest.mark.parametrize("action,match", [
    (json_reply(503, {"error": "overloaded"}), "HTTP 503"),
    (reset(), "dropped the connection"),
    (truncate(_ok(), keep=10), "dropped the connection"),
    (bad_status(), "dropped the connection"),
])
def test_transient_faults_are_retried_then_reported(pair, action, match):
    with FakeEngine({("POST", "/v1/completions"): [action]}) as fake:
        api = APIBase(fake.url, pair[2], top_logprobs=3, timeout=3, retries=2, backoff=0.05, dialect="vllm")
        err, took = _timed(api)
        api.close()
    assert match in str(err) and "after 3 attempts" in str(err) and err.url.startswith(fake.url)
    assert api.requests == 3 and took < 1.5


@pytest.mark.parametrize("action", [json_reply(500, {}), reset(), truncate(_ok(), keep=5), bad_status()])
def test_a_transient_fault_then_success(pair, action):
    with FakeEngine({("POST", "/v1/completions"): [action, json_reply(200, _ok())]}) as fake:
        api = APIBase(fake.url, pair[2], top_logprobs=3, timeout=3, retries=1, backoff=0.01, dialect="vllm")
        ids, vals = api.top_k([[1, 2]])
        api.close()
    assert ids[0].tolist() == [0, 1, 2] and api.requests == 2


def test_4xx_is_not_retried(pair):
    with FakeEngine({("POST", "/v1/completions"): [json_reply(400, {"error": "bad"})]}) as fake:
        api = APIBase(fake.url, pair[2], timeout=3, retries=3, dialect="vllm")
        err, _ = _timed(api)
    assert err.status == 400 and api.requests == 1


def test_retries_stop_at_the_deadline(pair):
    with FakeEngine({("POST", "/v1/completions"): [json_reply(502, {})]}) as fake:
        api = APIBase(fake.url, pair[2], timeout=0.6, retries=50, backoff=0.1, dialect="vllm")
        err, took = _timed(api)
    assert "HTTP 502" in str(err) and took < 1.0 and api.requests < 10


@pytest.mark.parametrize("reply,match", [
    (_ok(n=1), "1 choices for 2 prompts"),
    (_ok(n=3), "3 choices for 2 prompts"),
    ({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{}]}}] * 2}, "no usable top_logprobs"),
    ({"choices": [{"index": 0, "logprobs": {"top_logprobs": []}}] * 2}, "empty top_logprobs"),
    ({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:99999": -1.0}]}}] * 2},
     "outside the shared vocabulary"),
    ({"choices": "nope"}, "top_logprobs"),
])
def test_wrong_entry_counts_and_shapes(pair, reply, match):
    with FakeEngine({("POST", "/v1/completions"): [json_reply(200, reply)]}) as fake:
        api = APIBase(fake.url, pair[2], timeout=3, dialect="vllm")
        err, took = _timed(api, rows=([1, 2], [3, 4]))
    assert match in str(err) and err.url and took < 1.5


def test_more_than_k_entries_are_cut_by_value(pair):
    # vLLM adds the sampled token when it is outside the top-K: K+1 entries, in any order
    top = {"token_id:7": -9.0, "token_id:1": -0.1, "token_id:4": -3.0, "token_id:2": -0.7}
    reply = {"choices": [{"index": 0, "logprobs": {"top_logprobs": [top]}}]}
    with FakeEngine({("POST", "/v1/completions"): [json_reply(200, reply)]}) as fake:
        api = APIBase(fake.url, pair[2], top_logprobs=3, timeout=3, dialect="vllm")
        ids, vals = api.top_k([[1, 2]])
    assert ids[0].tolist() == [1, 2, 4] and vals[0].tolist() == pytest.approx([-0.1, -0.7, -3.0])


def test_connections_are_reused_and_rows_go_out_concurrently(pair):
    def slow_ok(body):
        time.sleep(0.3)
        return json_reply(200, {"choices": [{"index": 0, "logprobs": {"content": [{"id": 5, "token": "x", "logprob": -1.0,
                          "top_logprobs": [{"id": 5, "token": "x", "bytes": [120], "logprob": -1.0}]}]}}]})
    with FakeEngine({("POST", "/v1/completions"): [slow_ok]}) as fake:
        api = APIBase(fake.url, pair[2], top_logprobs=1, timeout=5, dialect="llama-server")
        t0 = time.monotonic()
        ids, _ = api.top_k([[1, 2], [3], [4, 5, 6], [7]])
        took = time.monotonic() - t0
        api.top_k([[1, 2], [3], [4, 5, 6], [7]])
        n_conns = len(fake._conns)
        api.close()
    assert ids[:, 0].tolist() == [5, 5, 5, 5]
    assert took < 0.9                       # 4 rows x 0.3 s, concurrently
    assert n_conns <= 4                     # the second step reused the pooled connections
    assert [b["prompt"] for _, _, b in fake.log[:4]] and all(isinstance(b["prompt"][0], int) for _, _, b in fake.log)


# -- dialects -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("models,props,expected", [
    ({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm", "root": "m"}]}, None, "vllm"),
    ({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "llamacpp", "meta": {}}]}, None,
     "llama-server"),
    ({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me", "permissions": []}]}, None,
     "llama-cpp-python"),
    ({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "ipa-fast"}]}, None, "ipa-fast"),
    (None, {"default_generation_settings": {}, "total_slots": 1}, "llama-server"),
])
def test_dialect_detection(pair, models, props, expected):
    routes = {}
    if models is not None:
        routes[("GET", "/v1/models")] = [json_reply(200, models)]
    if props is not None:
        routes[("GET", "/props")] = [json_reply(200, props)]
    with FakeEngine(routes) as fake:
        api = APIBase(fake.url + "/v1", pair[2], timeout=3)
        assert api.detect_dialect() == expected
    assert api.requests == 0  # detection GETs are not completion requests
    if expected == "vllm":
        assert api.model == "m"


def test_unknown_server_asks_for_a_dialect(pair):
    with FakeEngine({("GET", "/v1/models"): [json_reply(200, {"data": [{"id": "m", "owned_by": "someone"}]})]}) as fake:
        api = APIBase(fake.url, pair[2], timeout=3)
        with pytest.raises(APIBaseError, match="pass dialect="):
            api.top_k([[1]])


def test_constructor_checks():
    tok = pytest.importorskip("tiny_models").make_tiny_tokenizer()
    with pytest.raises(ValueError, match="dialect"):
        APIBase("http://127.0.0.1:1", tok, dialect="openai")
    with pytest.raises(ValueError, match="one prompt per request"):
        APIBase("http://127.0.0.1:1", tok, dialect="llama-cpp-python", batch=True)
    with pytest.raises(ValueError, match="top_logprobs"):
        APIBase("http://127.0.0.1:1", tok, top_logprobs=0)


def test_bundled_server_is_detected(pair, server):
    api = APIBase(server.url, pair[2], top_logprobs=K)
    assert api.detect_dialect() == "ipa-fast"


def test_adapter_alpha_is_restored_over_an_api_base(pair, server, tmp_path):
    """The README's API-base path: TailoredLM.from_pretrained(APIBase(...), adapter_dir) takes the
    alpha (and prefix) stored in ipa_adapter.json; the bare constructor uses its own alpha=1.0."""
    base, adapter, tok = pair
    TailoredLM(base, adapter, tok, alpha=0.7).save_adapter(tmp_path / "adapter")
    api = APIBase(server.url, tok, top_logprobs=K)
    lm = TailoredLM.from_pretrained(api, tmp_path / "adapter", tokenizer=tok)
    assert lm.alpha == 0.7
    a = lm.generate(PROMPTS[:1], 3, seed=2, eos_token_id=[])
    b = TailoredLM(base, adapter, tok, alpha=0.7, base_top_k=K).generate(PROMPTS[:1], 3, seed=2, eos_token_id=[])
    assert a.token_ids == b.token_ids
    assert TailoredLM(api, adapter, tok).alpha == 1.0
