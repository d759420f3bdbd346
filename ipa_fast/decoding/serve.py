"""A small OpenAI-compatible completions server for a local Hugging Face model (stdlib only).

    python -m ipa_fast.decoding.serve --model path/to/base --port 8000 [--max-logprobs 20]
    # then: APIBase("http://127.0.0.1:8000/v1", tokenizer) as the base of a TailoredLM

or in Python (tests do this):

    with CompletionServer(model, tokenizer) as server:   # 127.0.0.1, a free port
        base = APIBase(server.url, tokenizer)

``POST /v1/completions`` takes ``prompt`` (a string, a list of ids, or a list of either),
``max_tokens``, ``temperature`` (0 = greedy), ``logprobs`` (top-k per generated token),
``return_tokens_as_token_ids`` (keys ``token_id:N``, as vLLM) and ``seed``; other OpenAI
fields (``model``, ``top_p``, ...) are accepted and ignored; ``stream`` and ``n`` other than 1
are refused. Teacher-forced scoring, in vLLM's shape: ``prompt_logprobs: K`` answers
``choices[i].prompt_logprobs``, one entry per prompt token - ``null`` for the first, then
``{"<id>": {"logprob": x, "rank": r, "decoded_token": s}}`` with the K most likely ids given the
tokens before it and the prompt token itself (always there, with its own rank); ``echo: true``
puts the prompt before the generated text and, with ``logprobs``, the prompt tokens (first
entry ``null``) before the generated ones in ``logprobs``, as vLLM does (``prompt_logprobs``
then defaults to ``logprobs``). Scored entries per request (prompt tokens x (K + 1)) are capped
(``max_prompt_logprob_entries``; 400 over it). ``GET /v1/models`` lists the model (``owned_by: "ipa-fast"``, which is how
:class:`~ipa_fast.decoding.api_base.APIBase` recognises it), ``GET /health`` answers ``{"status": "ok"}``,
``POST /tokenize`` (``{"prompt": text, "add_special_tokens": bool}``) the ids, as vLLM's does.

Hardening: a listen backlog of 1024; a cap on the body size (413), on ``max_tokens``, on rows
per request and on prompt + ``max_tokens`` (the model's context); a per-connection socket
timeout and a deadline for reading a request body (408); a bounded queue (503 when full);
every bad input is a 4xx with an OpenAI-style error body, never a 500. No lock is held across a
generation: one worker thread runs a step-level batcher - each step it runs one forward over
the rows of every request in flight (requests join between steps and leave when done), so a
1-token request waits at most about one step behind a long one. A request's sampling uses its
own generator, so it does not depend on what else is in flight.

Continuation cache: a client that decodes through the server (``APIBase``, and so tailored
decoding and training rollouts) sends every row again each step, one token longer. The server
keeps the KV cache of the rows it last ran (a few batches, LRU, at most ``kv_cache_tokens``
cached positions in all) keyed by their token ids; a request whose rows each extend a cached
row by exactly one token (any subset, order or repetition of that batch's rows) runs only the
new token over the cached keys and values, and anything else is recomputed in full. The
answers are the same up to float rounding. A tiny reference server still, not a fast one: use
vLLM or llama.cpp for big bases.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ipa_fast.decoding.tailored import left_pad


class BadRequest(ValueError):
    """A request the server refuses: answered with ``status`` (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024   # listen backlog: bursts of clients queue instead of being reset
    daemon_threads = True
    allow_reuse_address = True


class _Job:
    def __init__(self, rows, max_tokens, k, temperature, as_ids, seed, prompt_k=None, echo=False):
        self.rows = [list(r) for r in rows]
        self.prompt_len = [len(r) for r in rows]
        self.prompt_k, self.echo = prompt_k, echo
        self.prompt_out = None  # per row: the vLLM-shaped prompt_logprobs list
        self.n_prompt = sum(len(r) for r in rows)
        self.max_tokens, self.k, self.temperature, self.as_ids = max_tokens, k, temperature, as_ids
        self.gen = torch.Generator().manual_seed(seed)
        self.out = [{"tokens": [], "token_logprobs": [], "top_logprobs": []} for _ in rows]
        self.steps = 0
        self.error: BaseException | None = None
        self.done = threading.Event()


class CompletionServer:
    """Serve ``model`` (a HF causal LM) on ``host:port`` (port 0 = a free one) in a thread.

    Limits: ``max_logprobs`` (K), ``max_tokens`` per request, ``max_rows`` prompts per request,
    ``max_body_bytes``, ``context`` (prompt + max_tokens; default the model's
    ``max_position_embeddings`` / ``n_positions``), ``conn_timeout`` (seconds a connection may
    sit idle or take to send its request), ``max_queue`` (requests waiting or in flight),
    ``max_batch_rows`` (rows in one forward), ``kv_cache_tokens`` (positions kept by the
    continuation cache, rows x padded width over every cached batch; 0 = no cache; a position
    costs 2 x layers x KV heads x head size floats: 46 KB for SmolLM2-135M in float32).
    """

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "ipa-fast-local", max_logprobs: int = 20, vocab_size: int | None = None,
                 max_tokens: int = 512, max_rows: int = 64, max_body_bytes: int = 4 << 20,
                 context: int | None = None, conn_timeout: float = 30.0, max_queue: int = 1024,
                 max_batch_rows: int = 128, max_prompt_logprob_entries: int = 1 << 21,
                 kv_cache_tokens: int = 16384):
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.max_logprobs = max_logprobs
        out = model.get_output_embeddings()
        n_out = out.weight.shape[0] if out is not None else model.config.vocab_size
        self.V = vocab_size or min(len(tokenizer), n_out)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        cfg = model.config
        self.context = int(context or getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
                           or 2048)
        self.max_tokens, self.max_rows = max_tokens, max_rows
        self.max_body_bytes, self.conn_timeout = max_body_bytes, conn_timeout
        self.max_queue, self.max_batch_rows = max_queue, max(max_batch_rows, max_rows)
        self.max_prompt_logprob_entries = max_prompt_logprob_entries
        self._tok_lock = threading.Lock()      # HF fast tokenizers are not safe across threads
        self._cond = threading.Condition()
        self._pending: collections.deque[_Job] = collections.deque()
        self._active: list[_Job] = []
        self._stopping = False
        self.steps = 0  # forward passes run (for tests)
        self.kv_cache_tokens = max(0, int(kv_cache_tokens))
        self._kv: collections.OrderedDict = collections.OrderedDict()  # id -> _CachedBatch, oldest first
        self.kv_hits = 0  # request steps that ran one token over a cached batch (for tests)
        self.httpd = _HTTPServer((host, port), _handler(self))
        self.thread = None
        self._worker = threading.Thread(target=self._work, daemon=True, name="ipa-fast-serve-batcher")
        self._worker.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "CompletionServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- validation ------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text)["input_ids"])

    def _prompts(self, prompt) -> list[list[int]]:
        def is_ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str):
            rows = [self._encode(prompt)]
        elif is_ids(prompt):
            rows = [prompt]
        elif isinstance(prompt, list) and prompt:
            if len(prompt) > self.max_rows:
                raise BadRequest(f"at most {self.max_rows} prompts per request, got {len(prompt)}")
            rows = []
            for p in prompt:
                if isinstance(p, str):
                    rows.append(self._encode(p))
                elif is_ids(p):
                    rows.append(p)
                else:
                    raise BadRequest("prompt entries must be strings or non-empty lists of token ids")
        else:
            raise BadRequest("prompt must be a string, a list of token ids, or a non-empty list of either")
        for r in rows:
            if not r:
                raise BadRequest("a prompt tokenises to no tokens")
            if min(r) < 0 or max(r) >= self.V:
                raise BadRequest(f"prompt token ids must be in [0, {self.V})")
        return rows

    def parse(self, body) -> _Job:
        """Validate a request body; a :class:`_Job` or :class:`BadRequest`."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= self.max_tokens:
            raise BadRequest(f"max_tokens must be an int in [1, {self.max_tokens}]")
        k = body.get("logprobs")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.max_logprobs):
            raise BadRequest(f"logprobs must be an int in [0, {self.max_logprobs}]")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
                or not math.isfinite(temperature) or temperature < 0:
            raise BadRequest("temperature must be a finite number >= 0")
        seed = body.get("seed", 0)
        if seed is None:
            seed = 0
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            raise BadRequest("seed must be an int in [0, 2**63)")
        echo = body.get("echo", False)
        if echo is None:
            echo = False
        if not isinstance(echo, bool):
            raise BadRequest("echo must be a boolean")
        prompt_k = body.get("prompt_logprobs")
        if prompt_k is not None and (not isinstance(prompt_k, int) or isinstance(prompt_k, bool)
                                     or not 0 <= prompt_k <= self.max_logprobs):
            raise BadRequest(f"prompt_logprobs must be an int in [0, {self.max_logprobs}]")
        if prompt_k is None and echo and k is not None:
            prompt_k = k  # vLLM: echo with logprobs scores the prompt too
        if body.get("stream"):
            raise BadRequest("stream is not supported by this server")
        if body.get("n", 1) != 1 or body.get("best_of", 1) not in (1, None):
            raise BadRequest("n and best_of must be 1")
        as_ids = body.get("return_tokens_as_token_ids", False)
        if not isinstance(as_ids, bool):
            raise BadRequest("return_tokens_as_token_ids must be a boolean")
        rows = self._prompts(body.get("prompt"))
        longest = max(len(r) for r in rows)
        if prompt_k is not None:
            entries = sum(len(r) for r in rows) * (prompt_k + 1)
            if entries > self.max_prompt_logprob_entries:
                raise BadRequest(f"prompt_logprobs: {sum(len(r) for r in rows)} prompt tokens x {prompt_k + 1} "
                                 f"entries exceed this server's limit of {self.max_prompt_logprob_entries}")
        if longest + max_tokens > self.context:
            raise BadRequest(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.context} tokens")
        return _Job(rows, max_tokens, k, float(temperature), as_ids, seed, prompt_k, echo)

    # -- the batcher -----------------------------------------------------------------------------

    def tokenize(self, body) -> dict:
        """``POST /tokenize`` in vLLM's shape: ``{"prompt": text, "add_special_tokens": bool}`` ->
        ``{"tokens": [...], "count": n, "max_model_len": context}``."""
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise BadRequest('the body must be a JSON object with a string "prompt"')
        if len(body["prompt"]) > self.max_body_bytes:
            raise BadRequest("prompt too long")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise BadRequest("add_special_tokens must be a boolean")
        with self._tok_lock:
            ids = list(self.tokenizer(body["prompt"], add_special_tokens=special)["input_ids"])
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    def submit(self, job: _Job) -> _Job:
        with self._cond:
            if len(self._pending) + len(self._active) >= self.max_queue:
                raise BadRequest("server busy: too many requests in flight", status=503)
            self._pending.append(job)
            self._cond.notify()
        return job

    def complete(self, body: dict) -> dict:
        """Validate, generate and format one request (blocking)."""
        job = self.submit(self.parse(body))
        job.done.wait()
        if job.error is not None:
            raise job.error
        return self._reply(job)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for j in list(self._pending) + self._active:
                        j.error = RuntimeError("server shutting down")
                        j.done.set()
                    return
                n = sum(len(j.rows) for j in self._active)
                while self._pending and (not self._active or n + len(self._pending[0].rows) <= self.max_batch_rows):
                    j = self._pending.popleft()
                    self._active.append(j)
                    n += len(j.rows)
                jobs = list(self._active)
            try:
                self._step(jobs)
            except Exception as e:  # fail the jobs of this step, keep serving
                for j in jobs:
                    j.error = e
            with self._cond:
                for j in jobs:
                    if j.error is not None or j.steps >= j.max_tokens:
                        self._active.remove(j)
                        j.done.set()

    @torch.no_grad()
    def _score_prompts(self, job: _Job) -> None:
        """The job's prompt log-probs, before its first step: one teacher-forced forward."""
        ids, mask = left_pad(job.rows, self.pad_id, self.device)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        lp_all = torch.log_softmax(logits[..., :self.V].float(), dim=-1).cpu()
        W = ids.shape[1]
        k = job.prompt_k or 0
        job.prompt_out, job.echo_out = [], []
        for i, r in enumerate(job.rows):
            lp = lp_all[i, W - len(r):]  # lp[p] = the distribution of token p + 1
            entries, echo = [None], {"tokens": [self._key(r[0], job.as_ids)], "token_logprobs": [None],
                                     "top_logprobs": [None]}
            for p in range(1, len(r)):
                row, t = lp[p - 1], r[p]
                vals, top = row.topk(k) if k else (row[:0], torch.zeros(0, dtype=torch.long))
                entry = {}
                for rank, (q, v) in enumerate(zip(top.tolist(), vals.tolist()), 1):
                    entry[str(q)] = {"logprob": v, "rank": rank, "decoded_token": self._key(q, job.as_ids)}
                own = float(row[t])
                if str(t) not in entry:
                    entry[str(t)] = {"logprob": own, "rank": int((row > row[t]).sum()) + 1,
                                     "decoded_token": self._key(t, job.as_ids)}
                entries.append(entry)
                echo["tokens"].append(self._key(t, job.as_ids))
                echo["token_logprobs"].append(own)
                if job.k:
                    v2, t2 = row.topk(job.k)
                    echo["top_logprobs"].append({self._key(int(q), job.as_ids): float(v)
                                                 for q, v in zip(t2.tolist(), v2.tolist())})
            job.prompt_out.append(entries)
            job.echo_out.append(echo)

    @torch.no_grad()
    def _step(self, jobs: list[_Job]) -> None:
        for j in jobs:
            if j.steps == 0 and j.prompt_out is None and (j.prompt_k is not None or j.echo):
                self._score_prompts(j)
        hits = {id(j): self._continuation(j.rows) for j in jobs}
        miss = [j for j in jobs if hits[id(j)] is None]
        logprobs = {}
        if miss:  # one forward over every row without a cached prefix (each job's cache kept after)
            rows = [r for j in miss for r in j.rows]
            ids, mask = left_pad(rows, self.pad_id, self.device)
            pos = (mask.cumsum(1) - 1).clamp_(min=0)
            keep = self.kv_cache_tokens > 0
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=keep, logits_to_keep=1)
            lp = torch.log_softmax(out.logits[:, -1, :self.V].float(), dim=-1).cpu()
            at = 0
            for j in miss:
                n = len(j.rows)
                logprobs[id(j)] = lp[at:at + n]
                if keep:
                    sel = torch.arange(at, at + n, device=self.device)
                    self._remember(j.rows, _select_rows(out.cache, sel), ids.shape[1])
                at += n
        for j in jobs:  # one forward of the new token per job whose rows extend a cached batch
            hit = hits[id(j)]
            if hit is None:
                continue
            cache, width = hit
            lens = torch.tensor([len(r) - 1 for r in j.rows], device=self.device)
            cols = torch.arange(width + 1, device=self.device)
            mask = (cols.view(1, -1) >= (width - lens).view(-1, 1)).long()  # left pads 0, the new token 1
            last = torch.tensor([r[-1] for r in j.rows], device=self.device).view(-1, 1)
            out = self.model(input_ids=last, attention_mask=mask, position_ids=lens.view(-1, 1), cache=cache,
                             use_cache=True)
            logprobs[id(j)] = torch.log_softmax(out.logits[:, -1, :self.V].float(), dim=-1).cpu()
            self._remember(j.rows, out.cache, width + 1)
            self.kv_hits += 1
        self.steps += 1
        for j in jobs:
            lp = logprobs[id(j)]
            if j.temperature == 0:
                nxt = lp.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(lp / j.temperature, -1), 1, generator=j.gen).view(-1)
            for i, r in enumerate(j.rows):
                t = int(nxt[i])
                r.append(t)
                o = j.out[i]
                o["tokens"].append(self._key(t, j.as_ids))
                o["token_logprobs"].append(float(lp[i, t]))
                if j.k:
                    vals, top = lp[i].topk(j.k)
                    o["top_logprobs"].append({self._key(int(q), j.as_ids): float(v)
                                              for q, v in zip(top.tolist(), vals.tolist())})
            j.steps += 1

    # -- the continuation cache (worker thread only) -------------------------------------------------

    def _remember(self, rows, cache, width: int) -> None:
        """Keep ``cache`` (the KV of ``rows``, left-padded to ``width``) for a request that extends them."""
        if not self.kv_cache_tokens or len(rows) * width > self.kv_cache_tokens:
            return
        entry = _CachedBatch(rows, cache, width)
        self._kv[id(entry)] = entry
        while sum(e.size for e in self._kv.values()) > self.kv_cache_tokens:
            self._kv.popitem(last=False)

    def _continuation(self, rows):
        """``(cache, width)`` when every row is a row of one cached batch plus one token (the cache
        holds that batch's selected rows, and leaves the store), else None."""
        if not self._kv or any(len(r) < 2 for r in rows):
            return None
        keys = [tuple(r[:-1]) for r in rows]
        for eid, entry in reversed(self._kv.items()):  # newest first
            idx = [entry.index.get(k) for k in keys]
            if all(i is not None for i in idx):
                del self._kv[eid]
                if idx == list(range(entry.n_rows)):  # the same rows in the same order: the cache as is
                    return entry.cache, entry.width
                return _select_rows(entry.cache, torch.tensor(idx, device=self.device)), entry.width
        return None

    def _key(self, i: int, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{i}"
        with self._tok_lock:
            return self.tokenizer.decode([i])

    def _reply(self, job: _Job) -> dict:
        m = job.max_tokens
        choices = []
        for i, r in enumerate(job.rows):
            with self._tok_lock:
                text = self.tokenizer.decode(r[-m:])
            logprobs = job.out[i] if job.k is not None else None
            if job.echo:
                with self._tok_lock:
                    text = self.tokenizer.decode(r[:job.prompt_len[i]]) + text
                if logprobs is not None:
                    e = job.echo_out[i]
                    logprobs = {key: e[key] + logprobs[key] for key in ("tokens", "token_logprobs", "top_logprobs")}
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": "length"}
            if job.prompt_k is not None:
                choice["prompt_logprobs"] = job.prompt_out[i]
            choices.append(choice)
        n_gen = m * len(job.rows)
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": job.n_prompt, "completion_tokens": n_gen,
                          "total_tokens": job.n_prompt + n_gen}}


def _handler(server: CompletionServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"          # keep-alive: clients reuse connections
        timeout = server.conn_timeout          # per-connection socket timeout (idle / slow clients)

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, payload: dict, close: bool = False) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                self.close_connection = True

        def _error(self, code: int, message: str, close: bool = False) -> None:
            kind = "invalid_request_error" if code < 500 else "server_error"
            self._send(code, {"error": {"message": message, "type": kind, "code": code}}, close)

        def _route(self):
            return self.path.split("?", 1)[0].rstrip("/")

        def do_GET(self):
            route = self._route()
            if route == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "owned_by": "ipa-fast",
                     "max_model_len": server.context}]})
            elif route == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding"):
                raise BadRequest("chunked bodies are not supported: send Content-Length", 411)
            length = self.headers.get("Content-Length")
            if length is None:
                raise BadRequest("Content-Length is required", 411)
            try:
                n = int(length)
            except ValueError:
                raise BadRequest("bad Content-Length") from None
            if n < 0:
                raise BadRequest("bad Content-Length")
            if n > server.max_body_bytes:
                raise BadRequest(f"body of {n} bytes exceeds the limit of {server.max_body_bytes}", 413)
            deadline = time.monotonic() + server.conn_timeout
            chunks, got = [], 0
            while got < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BadRequest("the request body took too long to arrive", 408)
                self.connection.settimeout(min(left, server.conn_timeout))
                try:
                    chunk = self.rfile.read1(min(n - got, 1 << 16))
                except (socket.timeout, TimeoutError):
                    raise BadRequest("the request body took too long to arrive", 408) from None
                if not chunk:
                    raise BadRequest("the request body ended early")
                chunks.append(chunk)
                got += len(chunk)
            self.connection.settimeout(server.conn_timeout)
            return b"".join(chunks)

        def do_POST(self):
            if self._route() not in ("/v1/completions", "/tokenize"):
                self._error(404, f"no route {self.path}", close=True)
                return
            try:
                raw = self._read_body()
            except BadRequest as e:
                self._error(e.status, str(e), close=True)  # the body was not (fully) read
                return
            try:
                try:
                    body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                    raise BadRequest(f"the body is not valid JSON: {e}") from None
                if self._route() == "/tokenize":
                    self._send(200, server.tokenize(body))
                else:
                    self._send(200, server.complete(body))
            except BadRequest as e:
                self._error(e.status, str(e))
            except Exception as e:  # a server must answer, not hang the client
                self._error(500, f"{type(e).__name__}: {e}")

        def _method_not_allowed(self):
            self._error(405, f"method {self.command} not allowed", close=True)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed
    return Handler


class _CachedBatch:
    """One batch's KV cache for the continuation cache: its rows (token ids) by index, the cache
    (left-padded to ``width``) and its size in cached positions."""

    def __init__(self, rows, cache, width: int):
        self.index = {tuple(r): i for i, r in enumerate(rows)}
        self.n_rows = len(rows)
        self.cache, self.width, self.size = cache, width, len(rows) * width


def _select_rows(cache, indices: torch.Tensor):
    """A new cache holding ``cache``'s batch rows ``indices`` (copies; ``cache`` is unchanged)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.batch_select_indices(indices)
    return out


def _no_constant(name):
    raise BadRequest(f"{name} is not valid JSON")


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m ipa_fast.decoding.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model name or local path")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens per request")
    p.add_argument("--max-rows", type=int, default=64, help="cap on prompts per request")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--conn-timeout", type=float, default=30.0, help="per-connection socket timeout (s)")
    p.add_argument("--kv-cache-tokens", type=int, default=16384,
                   help="positions the continuation cache keeps (rows x width over its batches; 0 = off)")
    args = p.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    server = CompletionServer(model, tok, host=args.host, port=args.port, model_name=args.model,
                              max_logprobs=args.max_logprobs, max_tokens=args.max_tokens, max_rows=args.max_rows,
                              max_body_bytes=args.max_body_bytes, conn_timeout=args.conn_timeout,
                              kv_cache_tokens=args.kv_cache_tokens)
    print(f"serving {args.model} at {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
