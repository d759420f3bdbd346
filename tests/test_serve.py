"""The bundled server (ipa_fast.decoding.serve), hardened: every bad input is a 4xx (listed here), body /
rows / max_tokens / context caps, per-connection timeouts, 100 concurrent clients without a
reset, and a 1-token request is not stuck behind a long one (step-level batching, no lock held
across a generation). Loopback only, every wait bounded."""
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from ipa_fast.decoding.serve import CompletionServer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(pair):
    base, _, tok = pair
    with CompletionServer(base, tok, max_logprobs=8, max_tokens=64, max_rows=8, max_body_bytes=64 << 10,
                          conn_timeout=1.0) as s:
        yield s


def _port(server):
    return server.httpd.server_address[1]


def _post(server, body, *, raw=None, headers=None, timeout=20):
    conn = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    conn.request("POST", "/v1/completions", body=data, headers=h)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return out


def _ok(**kw):
    return {"prompt": [[5, 6, 7]], "max_tokens": 1, "logprobs": 3, **kw}


BAD_BODIES = {
    "not an object": [1, 2],
    "max_tokens 0": _ok(max_tokens=0),
    "max_tokens negative": _ok(max_tokens=-3),
    "max_tokens string": _ok(max_tokens="5"),
    "max_tokens float": _ok(max_tokens=1.5),
    "max_tokens bool": _ok(max_tokens=True),
    "max_tokens over the cap": _ok(max_tokens=65),
    "logprobs over the cap": _ok(logprobs=99),
    "logprobs negative": _ok(logprobs=-1),
    "logprobs string": _ok(logprobs="3"),
    "temperature negative": _ok(temperature=-1),
    "temperature string": _ok(temperature="hot"),
    "seed string": _ok(seed="x"),
    "seed negative": _ok(seed=-1),
    "prompt missing": {"max_tokens": 1},
    "prompt empty list": _ok(prompt=[]),
    "prompt empty row": _ok(prompt=[[]]),
    "prompt empty string": _ok(prompt=""),
    "prompt mixed ids": _ok(prompt=[1, "a"]),
    "prompt bool ids": _ok(prompt=[True, False]),
    "prompt negative id": _ok(prompt=[[-1]]),
    "prompt id past the vocabulary": _ok(prompt=[[10 ** 6]]),
    "prompt object": _ok(prompt={"a": 1}),
    "prompt number": _ok(prompt=5),
    "too many rows": _ok(prompt=[[1]] * 9),
    "prompt + max_tokens over the context": _ok(prompt=[[1] * 250], max_tokens=10),
    "echo string": _ok(echo="yes"),
    "prompt_logprobs over the cap": _ok(prompt_logprobs=10 ** 6),
    "prompt_logprobs negative": _ok(prompt_logprobs=-1),
    "prompt_logprobs bool": _ok(prompt_logprobs=True),
    "stream": _ok(stream=True),
    "n = 2": _ok(n=2),
    "return_tokens_as_token_ids string": _ok(return_tokens_as_token_ids="yes"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_bodies_are_400(server, name):
    status, reply = _post(server, BAD_BODIES[name])
    assert status == 400, (name, reply)
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]


@pytest.mark.parametrize("raw,code", [
    (b"{not json", 400),
    (b"\xff\xfe\x00garbage", 400),                                   # not UTF-8
    (b'{"prompt": [[1]], "max_tokens": 1, "temperature": NaN}', 400),  # non-standard JSON constant
    (b"[" * 100000 + b"]" * 100000, 413),                            # over the body cap (64 KiB here)
    (b"[" * 20000 + b"]" * 20000, 400),                              # nesting too deep for the parser
])
def test_bad_raw_bodies_are_4xx(server, raw, code):
    status, reply = _post(server, None, raw=raw)
    assert status == code and "error" in reply


def _raw_exchange(server, data: bytes, timeout=5.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", _port(server)), timeout=timeout)
    s.sendall(data)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except socket.timeout:
        pass
    s.close()
    return out


@pytest.mark.parametrize("request_bytes,code", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", b" 411 "),                       # no Content-Length
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b" 411 "),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", b" 400 "),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", b" 413 "),
    (b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", b" 404 "),
    (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", b" 404 "),
    (b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", b" 405 "),
    (b"DELETE /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", b" 405 "),
    (b"BLAH\r\n\r\n", b" 400 "),                                                           # bad request line
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"prompt\"", b" 408 "),  # body stalls
])
def test_bad_requests_are_4xx(server, request_bytes, code):
    t0 = time.monotonic()
    out = _raw_exchange(server, request_bytes)
    assert code.strip() in out.split(b"\r\n")[0], out[:200]
    assert time.monotonic() - t0 < 4


def test_idle_and_slow_connections_are_closed(server):
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", _port(server)), timeout=5)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\n")        # headers never finish
    assert s.recv(100) == b""                               # the server hangs up after conn_timeout
    s.close()
    assert time.monotonic() - t0 < 3


def test_models_health_and_keep_alive(server):
    conn = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=10)
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    models = json.loads(r.read())
    assert models["data"][0]["owned_by"] == "ipa-fast" and models["data"][0]["max_model_len"] == server.context
    conn.request("GET", "/health")                          # the same connection, kept alive
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    conn.request("POST", "/v1/completions", body=json.dumps(_ok(return_tokens_as_token_ids=True)), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and len(json.loads(r.read())["choices"][0]["logprobs"]["top_logprobs"][0]) == 3
    conn.close()


def test_100_concurrent_clients_no_resets(server):
    results, errors = [], []

    def client(i):
        try:
            results.append(_post(server, {"prompt": [[i % 50 + 1, 2, 3]], "max_tokens": 2, "logprobs": 2,
                                          "return_tokens_as_token_ids": True}, timeout=60))
        except Exception as e:  # a reset / refused connection lands here
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    go = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert len(results) == 100 and all(s == 200 for s, _ in results)
    assert all(len(r["choices"][0]["logprobs"]["top_logprobs"]) == 2 for _, r in results)
    assert time.monotonic() - go < 60


class _Slow:
    """The model, 20 ms slower per forward: makes scheduling visible."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kw):
        time.sleep(0.02)
        return self.model(**kw)


def test_short_request_is_not_stuck_behind_a_long_one(pair):
    base, _, tok = pair
    with CompletionServer(base, tok, max_logprobs=4, max_tokens=200) as s:
        s.model = _Slow(base)
        done = {}

        def run(name, body):
            t0 = time.monotonic()
            status, _ = _post(s, body, timeout=60)
            done[name] = (status, time.monotonic() - t0, time.monotonic())

        long = threading.Thread(target=run, args=("long", {"prompt": [[1, 2]], "max_tokens": 60, "logprobs": 2}))
        long.start()
        t_wait = time.monotonic()
        while s.steps < 3 and time.monotonic() - t_wait < 10:
            time.sleep(0.005)
        run("short", {"prompt": [[3, 4, 5]], "max_tokens": 1, "logprobs": 2})
        long.join(60)
    assert done["long"][0] == 200 and done["short"][0] == 200
    assert done["short"][1] < done["long"][1] / 4         # about one step, not the long one's 60 (>= 1.2 s)
    assert done["short"][2] < done["long"][2]             # it finished first


def test_same_reply_whatever_else_is_in_flight(pair):
    """Batching changes nothing a request sees: its own seed, its own rows."""
    base, _, tok = pair
    body = {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "logprobs": 3, "seed": 7,
            "return_tokens_as_token_ids": True}
    with CompletionServer(base, tok, max_logprobs=4) as s:
        alone = _post(s, body)[1]
        out = []
        ts = [threading.Thread(target=lambda: out.append(_post(s, body)[1])) for _ in range(4)]
        ts += [threading.Thread(target=lambda: _post(s, {"prompt": [[9] * 30], "max_tokens": 6, "logprobs": 1}))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    for r in out:
        for a, b in zip(alone["choices"], r["choices"]):
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
            assert a["logprobs"]["top_logprobs"][0].keys() == b["logprobs"]["top_logprobs"][0].keys()
            for k, v in a["logprobs"]["top_logprobs"][0].items():
                assert b["logprobs"]["top_logprobs"][0][k] == pytest.approx(v, abs=1e-4)


# -- the continuation cache: a request extending cached rows by one token runs that token only ----------

def _top(server, rows, k=6):
    """Each row's next-token top-k as {id: logprob}, through the server."""
    status, r = _post(server, {"prompt": rows, "max_tokens": 1, "logprobs": k, "return_tokens_as_token_ids": True})
    assert status == 200, r
    return [{int(key.split(":")[1]): v for key, v in c["logprobs"]["top_logprobs"][0].items()} for c in r["choices"]]


def _assert_close(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_continuation_cache_runs_only_the_new_token_and_matches_recompute(arch):
    from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_model(arch, len(tok), 3)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (7, 3, 5, 5)]
    seen = []

    class Counting(torch.nn.Module):  # counts the input positions each forward runs
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_output_embeddings(self):
            return self.m.get_output_embeddings()

        def forward(self, **kw):
            seen.append(kw["input_ids"].numel())
            return self.m(**kw)

    with CompletionServer(model, tok, max_logprobs=8) as cached, \
            CompletionServer(model, tok, max_logprobs=8, kv_cache_tokens=0) as plain:
        cached.model = Counting(model)
        for step in range(5):
            got, want = _top(cached, rows), _top(plain, rows)
            _assert_close(got, want)
            # the next request: every row one token longer (a different token per row)
            rows = [r + [10 + 7 * step + i] for i, r in enumerate(rows)]
        assert cached.kv_hits == 4 and plain.kv_hits == 0
        assert seen[0] == 4 * 7 and seen[1:] == [4] * 4  # the first request in full, then one token a row
        # a subset of the cached rows, reordered, one repeated: still one token a row
        sub = [rows[2], rows[0], rows[2]]
        _assert_close(_top(cached, sub), _top(plain, sub))
        assert cached.kv_hits == 5 and seen[-1] == 3
        # a row two tokens past the cache, or a changed one: recomputed in full
        seen.clear()
        other = [rows[1] + [5], rows[3][:-1] + [9, 9]]
        _assert_close(_top(cached, other), _top(plain, other))
        assert cached.kv_hits == 5 and seen == [2 * max(len(r) for r in other)]
        # multi-token requests use the cache between their own steps, sampled the same way
        body = {"prompt": rows[:2], "max_tokens": 4, "logprobs": 3, "seed": 11, "return_tokens_as_token_ids": True}
        a, b = _post(cached, body)[1], _post(plain, body)[1]
        for ca, cb in zip(a["choices"], b["choices"]):
            assert ca["logprobs"]["tokens"] == cb["logprobs"]["tokens"]
            assert ca["logprobs"]["token_logprobs"] == pytest.approx(cb["logprobs"]["token_logprobs"], abs=1e-5)


def test_continuation_cache_keeps_within_its_budget(pair):
    base, _, tok = pair
    rows = [[1, 2, 3, 4, 5, 6]] * 4
    with CompletionServer(base, tok, max_logprobs=8, kv_cache_tokens=30) as s:
        _top(s, rows)  # 4 rows x 6 = 24 positions: kept
        assert sum(e.size for e in s._kv.values()) == 24
        _top(s, [[7, 8, 9, 10]] * 2)  # 8 more: over 30, the oldest batch goes
        assert [e.size for e in s._kv.values()] == [8]
        _top(s, [[1] * 40])  # larger than the whole budget: not kept
        assert [e.size for e in s._kv.values()] == [8]
