"""API-only bases: a real HTTP server on 127.0.0.1 (ipa_fast.serve, tiny model, top-k
log-probs) against the in-process sparse-base path; key mapping; failures give clear errors
fast (timeouts), never a hang."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from ipa_fast.api_base import APIBase, APIBaseError, completions_url
from ipa_fast.decoding import TailoredLM
from ipa_fast.serve import CompletionServer

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


class _Fake:
    """A stdlib server answering every POST with a fixed body (or sleeping)."""

    def __init__(self, body: bytes, delay: float = 0.0):
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(fake.delay)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(fake.body)))
                    self.end_headers()
                    self.wfile.write(fake.body)
                except OSError:
                    pass

        self.body, self.delay = body, delay
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("body,match", [
    (b"this is not json", "malformed JSON"),
    (json.dumps({"choices": [{"index": 0, "text": "x"}]}).encode(), "top_logprobs"),
    (json.dumps({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"zz-unknown-zz": -0.1}]}}]}).encode(),
     "not exactly one token"),
    (json.dumps({"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:3": "high"}]}}]}).encode(),
     "bad log-prob"),
])
def test_malformed_replies_are_clear_errors(pair, body, match):
    fake = _Fake(body)
    try:
        with pytest.raises(APIBaseError, match=match):
            APIBase(fake.url, pair[2], timeout=5).top_k([[1, 2]])
    finally:
        fake.close()


def test_slow_server_times_out(pair):
    fake = _Fake(b"{}", delay=3.0)
    try:
        t0 = time.time()
        with pytest.raises(APIBaseError, match="timed out"):
            APIBase(fake.url, pair[2], timeout=0.5).top_k([[1, 2]])
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
        api = APIBase(fake.url, pair[2], top_logprobs=K, timeout=5)
        dense = api.prefill([[1, 2]], 1)
    finally:
        fake.close()
    assert dense[0, 3] == -0.5 and dense[0, 0] == -1.0
    assert torch.isinf(dense[0]).sum() == dense.shape[1] - 2
