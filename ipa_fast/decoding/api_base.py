"""A base LM reachable only over an OpenAI-compatible completions endpoint with top-k log-probs.

    base = APIBase("http://127.0.0.1:8000/v1", tokenizer, top_logprobs=20)   # dialect detected
    lm = TailoredLM.from_pretrained(base, "path/to/adapter")   # alpha, prefix from ipa_adapter.json
    lm.generate(["The cat"], max_new_tokens=32, top_p=0.9, seed=0)

Each decoding step asks the server for the next-token top-K log-probs of every active row
(prompt ids + generated ids so far) with ``max_tokens=1``; the server's prefix cache (vLLM's,
llama.cpp's) makes that incremental. The base is then dense with ``-inf`` outside its top-K
(docs/DESIGN.md §2.10 sparse base): the tailored policy can re-rank the base's top-K, never add tokens
outside it.

Dialects (``dialect=`` or detected, see :func:`detect_dialect`):

``"vllm"``  vLLM's OpenAI server. Rows go out as token ids, all rows in one request
    (``prompt: [[ids], ...]``), with ``return_tokens_as_token_ids`` so keys are ``token_id:N``.
``"llama-server"``  llama.cpp's C++ server. One row per request (sent concurrently) as token
    ids; it answers ``logprobs.content[0].top_logprobs[] = {id, token, bytes, logprob}`` and the
    ids are used. Its log-probs are the raw softmax (``post_sampling_probs: false``), so the
    ``logit_bias`` of -100 that keeps the server's own one-token sample off the ids where it
    answers ``logprobs: null`` does not change them: the end-of-generation tokens (it would end)
    and the tokens whose text ends inside a UTF-8 character (it holds such text back; 3 of 6 seeds
    on a Japanese prompt, recorded).
``"llama-cpp-python"``  llama-cpp-python's server. It takes one *text* prompt per request
    (sent concurrently) and keys its top log-probs by printed token strings. The row is sent as
    ``tokenizer.decode(row)`` only when the tokenizer encodes that text back to exactly the row
    (else the call fails: the server would condition on other ids). Keys map back to ids
    exactly: the client computes what the server prints for every id (the token's bytes
    decoded as UTF-8 with invalid bytes dropped; control tokens and tokens over 32 bytes print
    ``""``; checked against the engine's own detokenize for every id of the recorded model) and
    accepts a key printed by exactly one id. A key printed by several ids (``""`` is printed by
    end-of-text, every control token, every partial UTF-8 byte token and every token over 32
    bytes; ``" "`` by the space token and every space + partial-byte token; the server keeps
    only the last of colliding keys) cannot be mapped: ``ambiguous="error"`` (default) fails
    naming it, ``ambiguous="drop"`` leaves those ids out of that step's top-K (so with this
    server the tailored policy cannot choose end-of-text: end rows with ``stop`` /
    ``max_new_tokens``). Such keys are common (a plain English step's top-20 can hold ``" "``;
    non-Latin text loses most of its top-K): prefer a server that returns ids.
    The request carries ``logit_bias`` -100 on the tokenizer's special ids (end-of-text among
    them) and ``temperature`` 0: without it a step where the server's own sample is
    end-of-text answers ``top_logprobs: []``. The bias acts in the sampler only; the reported
    log-probs come from the unbiased logits, so end-of-text keeps its true log-prob (under the
    ambiguous ``""`` key, see above). The server needs ``--logits_all true`` (its default).
``"ipa-fast"``  :mod:`ipa_fast.decoding.serve`: ids in, batched, ``token_id:N`` keys, like vLLM.

Ids are never guessed from strings when the server can return ids: a string key from an id
dialect is an error. Every failure is an :class:`APIBaseError` carrying the URL and the cause.
``timeout`` is a real deadline for one call (one decoding step, all its rows): connecting,
sending, waiting, reading a slowly dripped body, retries and their back-off all fit in it.
Connection errors, resets, truncated replies and HTTP 5xx/429 are retried up to ``retries``
times with exponential back-off (``backoff``, ``2 * backoff``, ...) while the deadline allows.
Connections are pooled and reused (httpx).
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import threading
import time

import httpx
import torch

DIALECTS = ("vllm", "llama-server", "llama-cpp-python", "ipa-fast")
#: what a client does with a text key that several token ids print as: fail naming it, or leave those ids out
AMBIGUOUS = ("error", "drop")
LLAMA_CPP_PYTHON_PIECE = 32  # bytes: llama-cpp-python prints a longer token as ""
#: dialect -> (batches by default, can batch): llama-server answers a list of id prompts with one
#: choice each (recorded), but by default its rows go out concurrently, one per request
_BATCHING = {"vllm": (True, True), "ipa-fast": (True, True), "llama-server": (False, True),
             "llama-cpp-python": (False, False)}


class APIBaseError(RuntimeError):
    """The API base could not be used: server down, timeout, HTTP error, malformed reply.

    ``url``: the server URL the call went to; ``cause``: a short reason (also in the message);
    ``status``: the HTTP status when there was one."""

    def __init__(self, message: str, *, url: str | None = None, cause: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.url, self.cause, self.status = url, cause if cause is not None else message, status


class _Retryable(Exception):
    def __init__(self, message, cause, status=None):
        super().__init__(message)
        self.message, self.cause, self.status = message, cause, status


def completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


def server_root(url: str) -> str:
    """``http://host:port`` (plus any path before ``/v1``) of a completions URL."""
    url = completions_url(url)
    for tail in ("/v1/completions", "/completions"):
        if url.endswith(tail):
            return url[: -len(tail)]
    return url


def dialect_from_replies(models: dict | None, props: dict | None = None) -> str | None:
    """The detection rule, on the JSON of ``GET /v1/models`` and (if needed) ``GET /props``.

    ``data[0].owned_by`` names the server: ``"vllm"`` -> vllm, ``"llamacpp"`` -> llama-server,
    ``"ipa-fast"`` -> ipa-fast, ``"me"`` (llama-cpp-python's fixed value, next to a
    ``permissions`` list) -> llama-cpp-python. Otherwise a ``/props`` reply with
    ``default_generation_settings`` is llama-server's. Anything else: None (pass ``dialect=``).
    """
    try:
        entry = (models or {}).get("data", [None])[0] or {}
    except (AttributeError, IndexError, TypeError):
        entry = {}
    owned = entry.get("owned_by") if isinstance(entry, dict) else None
    if owned == "vllm":
        return "vllm"
    if owned == "llamacpp":
        return "llama-server"
    if owned == "ipa-fast":
        return "ipa-fast"
    if owned == "me" and "permissions" in entry:
        return "llama-cpp-python"
    if isinstance(props, dict) and "default_generation_settings" in props:
        return "llama-server"
    return None


class APIBase:
    """Top-k next-token log-probs from an OpenAI-compatible completions server.

    ``url``: the server (``http://host:port``, ``.../v1`` or the full completions URL).
    ``tokenizer``: the shared tokenizer. ``top_logprobs``: K (a reply with more entries is cut
    to the K largest, one with fewer is padded with copies of its first entry).
    ``dialect``: one of :data:`DIALECTS`, or None to detect it on first use.
    ``timeout``: deadline in seconds of one call (all rows of a step, retries included).
    ``retries`` / ``backoff``: retries of connection errors and HTTP 5xx/429, and the first
    back-off in seconds (doubling). ``batch``: None = the dialect's way; False = one request
    per row (sent concurrently, at most ``max_concurrency`` at a time); True = all rows in one
    request (vllm, ipa-fast, llama-server). ``ambiguous``: ``"error"`` or ``"drop"`` for a string key
    printed by several ids (llama-cpp-python only). ``extra_body``: merged into each request.
    """

    def __init__(self, url: str, tokenizer, *, model: str | None = None, top_logprobs: int = 20,
                 timeout: float = 30.0, api_key: str | None = None, batch: bool | None = None,
                 extra_body: dict | None = None, dialect: str | None = None, retries: int = 2,
                 backoff: float = 0.2, max_concurrency: int = 16, ambiguous: str = "error"):
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        if dialect is not None and dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS} or None, got {dialect!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_concurrency < 1:
            raise ValueError("timeout must be > 0, retries and backoff >= 0, max_concurrency >= 1")
        if ambiguous not in AMBIGUOUS:
            raise ValueError(f"ambiguous must be 'error' or 'drop', got {ambiguous!r}")
        self.url = completions_url(url)
        self.root = server_root(url)
        self.tokenizer = tokenizer
        self.model = model
        self.top_logprobs = top_logprobs
        self.timeout = float(timeout)
        self.api_key = api_key
        self.batch = batch
        self.extra_body = dict(extra_body or {})
        self.dialect = dialect
        self.retries, self.backoff = int(retries), float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.ambiguous = ambiguous
        self.vocab_size = len(tokenizer)
        self.device = torch.device("cpu")
        self.requests = 0  # completion requests sent, retries included (for benchmarks / tests)
        self.dropped = 0   # ambiguous keys left out (ambiguous="drop")
        self._printed = None
        self._bias = None      # the logit_bias keeping a server's own sample off bad ids (_sample_bias)
        self._cut_utf8 = set()  # llama-server: ids whose text ends inside a UTF-8 character
        self._adds_bos = None
        self._echo_checked = False
        self._loop = None
        self._client = None
        self._lock = threading.Lock()
        if dialect is not None:
            self._check_batch()

    # -- the event loop the HTTP calls run on ------------------------------------------------

    def _run(self, coro_fn, *args, timeout: float | None = None):
        """Run ``coro_fn(*args, deadline)`` on this base's loop thread; the deadline (``timeout``
        seconds from now, default :attr:`timeout`) is enforced."""
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True, name="ipa-fast-apibase").start()
                self._loop = loop
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout

        async def bounded():
            try:
                return await asyncio.wait_for(coro_fn(*args, deadline), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise APIBaseError(f"API base {self.url} timed out after {timeout:g} s",
                                   url=self.url, cause="timeout") from None

        fut = asyncio.run_coroutine_threadsafe(bounded(), self._loop)
        try:
            return fut.result(timeout + 5.0)  # the loop enforces the deadline; this is a backstop
        except APIBaseError:
            raise
        except Exception as e:  # the backstop, or a bug surfacing as a plain exception
            fut.cancel()
            raise APIBaseError(f"API base {self.url}: {type(e).__name__}: {e}", url=self.url,
                               cause=type(e).__name__) from None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.max_concurrency,
                                  max_keepalive_connections=self.max_concurrency)
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(limits=limits, headers=headers, trust_env=False)
        return self._client

    def close(self) -> None:
        """Close the pooled connections and stop the loop thread (a later call starts them again)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        client, self._client = self._client, None
        if client is not None:
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(5)
            except Exception:
                pass
        loop.call_soon_threadsafe(loop.stop)
        self._loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # no waiting here: just stop the loop thread
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass

    async def _request(self, method: str, url: str, body: dict | None, deadline: float, *,
                       completion: bool = True):
        """One HTTP call with retries inside the deadline; returns the parsed JSON."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                if time.monotonic() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if completion:
                self.requests += 1
            try:
                resp = await self._http().request(method, url, content=data, headers=headers,
                                                  timeout=httpx.Timeout(left))
            except httpx.TimeoutException:
                raise APIBaseError(f"API base {url} timed out after {self.timeout} s", url=url,
                                   cause="timeout") from None
            except httpx.ConnectError as e:
                last = _Retryable(f"cannot reach API base {url}: {e or type(e).__name__}", f"connect: {e}")
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                last = _Retryable(f"API base {url} dropped the connection or sent a broken reply "
                                  f"({type(e).__name__}: {e})", f"{type(e).__name__}: {e}")
                continue
            except httpx.HTTPError as e:
                raise APIBaseError(f"API base {url}: {type(e).__name__}: {e}", url=url,
                                   cause=type(e).__name__) from None
            raw = resp.content
            if resp.status_code >= 500 or resp.status_code == 429:
                detail = raw[:300].decode(errors="replace")
                last = _Retryable(f"API base {url} answered HTTP {resp.status_code}: {detail}",
                                  f"HTTP {resp.status_code}", resp.status_code)
                continue
            if resp.status_code >= 400:
                detail = raw[:300].decode(errors="replace")
                raise APIBaseError(f"API base {url} answered HTTP {resp.status_code}: {detail}", url=url,
                                   cause=f"HTTP {resp.status_code}", status=resp.status_code)
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIBaseError(f"API base {url} returned malformed JSON: {raw[:200]!r}", url=url,
                                   cause="malformed JSON", status=resp.status_code) from None
        if last is None:
            raise APIBaseError(f"API base {url} timed out after {self.timeout} s", url=url, cause="timeout")
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        raise APIBaseError(last.message + tries, url=url, cause=last.cause, status=last.status)

    def _post(self, body: dict) -> dict:
        """POST ``body`` to the completions URL (deadline, retries); the parsed JSON reply."""
        return self._run(lambda b, d: self._request("POST", self.url, b, d), body)

    # -- dialect ---------------------------------------------------------------------------------

    def detect_dialect(self) -> str:
        """The server's dialect (cached in ``self.dialect``); see :func:`dialect_from_replies`."""
        if self.dialect is None:
            self.dialect = self._run(self._detect)
            self._check_batch()
        return self.dialect

    async def _detect(self, deadline):
        models = props = None
        try:
            models = await self._request("GET", self.root + "/v1/models", None, deadline, completion=False)
        except APIBaseError as e:
            if e.status is None or e.cause == "timeout":
                raise  # not reachable: no point in a second route
        found = dialect_from_replies(models)
        if found is None:
            try:
                props = await self._request("GET", self.root + "/props", None, deadline, completion=False)
            except APIBaseError as e:
                if e.status is None or e.cause == "timeout":
                    raise
            found = dialect_from_replies(models, props)
        if found is None:
            raise APIBaseError(
                f"cannot tell which server answers at {self.root} (GET /v1/models: "
                f"{json.dumps(models)[:200] if models is not None else 'no JSON'}); pass dialect= one of {DIALECTS}",
                url=self.root, cause="unknown dialect")
        if self.model is None and found == "vllm":
            try:
                self.model = models["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                pass
        return found

    def _check_batch(self):
        if self.batch and not _BATCHING[self.dialect][1]:
            raise ValueError(f"batch=True: the {self.dialect} dialect takes one prompt per request")

    def _batched(self) -> bool:
        return _BATCHING[self.dialect][0] if self.batch is None else bool(self.batch)

    # -- one step --------------------------------------------------------------------------------

    def top_k(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token top-k of each row: ``(ids [B, K] int64, logprobs [B, K] float32)``.

        A reply with more than K entries is cut to the K largest log-probs; one with fewer is
        padded with copies of its first entry."""
        self.detect_dialect()
        rows = [[int(t) for t in r] for r in rows]
        if self.dialect == "llama-cpp-python":
            prompts = [self._text_prompt(r) for r in rows]
        else:
            prompts = rows
        pairs = self._run(self._step, prompts, [len(r) for r in rows])
        K = self.top_logprobs
        ids = torch.zeros((len(rows), K), dtype=torch.long)
        vals = torch.full((len(rows), K), float("-inf"))
        for i, p in enumerate(pairs):
            if not p:
                raise APIBaseError(f"API base {self.url} returned no usable top_logprobs for row {i}",
                                   url=self.url, cause="empty top_logprobs")
            p = sorted(p, key=lambda e: -e[1])[:K]
            # A short reply is padded by repeating its first entry, so a scatter writes it twice
            # with the same value (never a stray -inf over a real entry).
            p += [p[0]] * (K - len(p))
            ids[i] = torch.tensor([e[0] for e in p])
            vals[i] = torch.tensor([e[1] for e in p])
        return ids, vals

    # -- teacher-forced scoring ---------------------------------------------------------------

    def score_top_k(self, rows: list[list[int]], start) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Teacher-forced top-k of given sequences (docs/DESIGN.md §2.10, scored sequences).

        For each row ``r`` and each position ``t`` in ``[start_r, len(r))``: the base's top-K
        next-token ids and log-probs given ``r[:t]``, and the log-prob of ``r[t]`` itself (the
        token that is there, which may lie outside the top-K). ``start``: one int for all rows
        or one per row, ``1 <= start_r <= len(r)``. Returns per row ``(ids [n, K] int64,
        logprobs [n, K] float32, chosen [n] float32)`` with ``n = len(r) - start_r``; ``chosen``
        is NaN where the server did not report it (llama-cpp-python reports it only inside the
        top-K). Short replies are padded as in :meth:`top_k`.

        Dialects: ``vllm`` and ``ipa-fast`` (all rows of a chunk in one request, vLLM's
        ``prompt_logprobs=K``: one ``{id: {"logprob", "rank"}}`` dict per prompt token, the
        first null, the prompt token itself always included); ``llama-cpp-python`` (one text
        request per row, ``echo: true`` + ``logprobs``: its echoed ``top_logprobs[i]`` is the
        distribution after the first ``i + 1`` prompt tokens, so ``start_r >= 2``; the keys are
        printed strings, mapped as in :meth:`top_k`; the alignment is checked once per base
        against a plain :meth:`top_k` of the first row). ``llama-server`` has no prompt
        log-probs: one next-token request per position, the server's sample forced onto the
        row's token so its log-prob comes back (:meth:`_llama_server_score`; rows concurrently,
        each request with its own deadline). Otherwise one call: the deadline, retries and errors
        of :meth:`top_k`.
        """
        self.detect_dialect()
        rows = [[int(t) for t in r] for r in rows]
        starts = [int(start)] * len(rows) if isinstance(start, int) else [int(s) for s in start]
        if len(starts) != len(rows):
            raise ValueError(f"start: one per row ({len(rows)} rows), got {len(starts)}")
        least = 2 if self.dialect == "llama-cpp-python" else 1
        for i, (r, s) in enumerate(zip(rows, starts)):
            if not least <= s <= len(r):
                raise ValueError(f"start of row {i} must be in [{least}, {len(r)}] (its length), got {s}"
                                 + (" (llama-cpp-python echoes no log-probs for the first prompt token)"
                                    if self.dialect == "llama-cpp-python" and s == 1 else ""))
        out: list = [None] * len(rows)
        todo = [i for i, (r, s) in enumerate(zip(rows, starts)) if s < len(r)]
        for i, (r, s) in enumerate(zip(rows, starts)):
            if s == len(r):
                out[i] = (torch.zeros((0, self.top_logprobs), dtype=torch.long),
                          torch.zeros((0, self.top_logprobs)), torch.zeros(0))
        if not todo:
            return out
        if self.dialect == "llama-cpp-python" and not self._echo_checked:
            self._check_echo_alignment(rows[todo[0]])
        if self.dialect == "llama-server":  # one request per position: the deadline is per request
            most = max(len(rows[i]) - starts[i] for i in todo)
            got = self._run(self._llama_server_score, [rows[i] for i in todo], [starts[i] for i in todo],
                            timeout=self.timeout * most)
        else:
            got = self._run(self._score, [rows[i] for i in todo])
        for i, per_pos in zip(todo, got):
            r, s = rows[i], starts[i]
            n = len(r) - s
            K = self.top_logprobs
            ids = torch.zeros((n, K), dtype=torch.long)
            vals = torch.full((n, K), float("-inf"))
            chosen = torch.full((n,), float("nan"))
            for j, t in enumerate(range(s, len(r))):
                pairs = per_pos[t]
                if not pairs:
                    raise APIBaseError(f"API base {self.url} returned no usable prompt log-probs for row {i}, "
                                       f"position {t}", url=self.url, cause="empty prompt logprobs")
                own = dict(pairs).get(r[t])
                if own is not None:
                    chosen[j] = own
                p = sorted(pairs, key=lambda e: -e[1])[:K]
                p += [p[0]] * (K - len(p))
                ids[j] = torch.tensor([e[0] for e in p])
                vals[j] = torch.tensor([e[1] for e in p])
            out[i] = (ids, vals, chosen)
        return out

    TOKENIZER_PROBE = "The quick brown fox, 12 apples; naïve café!"

    def check_tokenizer(self, text: str | None = None) -> bool:
        """One tokenize round trip: the server's ids for ``text`` must be the shared tokenizer's
        (a leading BOS on either side aside). vllm and ipa-fast: ``POST /tokenize``;
        llama-cpp-python: ``POST /extras/tokenize``; llama-server: ``POST /tokenize``
        (``content``). False when the server has no such route (nothing checked); an
        :class:`APIBaseError` naming both id lists when they differ."""
        self.detect_dialect()
        text = self.TOKENIZER_PROBE if text is None else text
        if self.dialect == "llama-cpp-python":
            url, body, key = self.root + "/extras/tokenize", {"input": text}, "tokens"
        elif self.dialect == "llama-server":
            url, body, key = self.root + "/tokenize", {"content": text}, "tokens"
        else:
            url, body, key = self.root + "/tokenize", {"prompt": text, "add_special_tokens": False}, "tokens"
            if self.model is not None:
                body["model"] = self.model
        try:
            reply = self._run(lambda b, d: self._request("POST", url, b, d, completion=False), body)
        except APIBaseError as e:
            if e.status in (404, 405):
                return False
            raise
        theirs = reply.get(key) if isinstance(reply, dict) else None
        if not isinstance(theirs, list) or not all(isinstance(t, int) for t in theirs):
            raise self._bad(f"no {key} list from {url}", reply)
        ours = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id

        def strip(ids):
            return ids[1:] if ids and bos is not None and ids[0] == bos else ids
        if strip(theirs) != strip(ours):
            raise APIBaseError(
                f"tokenizer mismatch: the server at {self.root} tokenises {text!r} to {theirs[:16]}, the local "
                f"tokenizer to {ours[:16]}; the adapter directory must carry the served base's tokenizer",
                url=self.root, cause="tokenizer mismatch")
        return True

    SCORE_CHUNK = 32  # rows per batched scoring request (the bundled server takes 64)

    async def _llama_server_score(self, rows, starts, _deadline):
        """llama-server has no prompt log-probs: position t's top-K is the next-token top-K of
        ``row[:t]``, asked in order within a row (each request extends the slot's cached prefix by
        one token), rows concurrently; each request has its own deadline (:attr:`timeout`). The
        request biases the server's own sample onto ``row[t]`` (+100), so the reply's sampled
        entry is that token with its raw log-prob, also outside the top-K; a token the server would
        hold back (it ends inside a UTF-8 character) is not forced and gets its log-prob only from
        inside the top-K."""
        held = self._sample_bias()
        sem = asyncio.Semaphore(self.max_concurrency)

        async def position(row, t):
            body = dict(self._body([row[:t]]), prompt=row[:t])
            target = row[t]
            forced = target not in self._cut_utf8
            if forced:
                body["logit_bias"] = dict(held, **{str(target): 100})
            deadline = time.monotonic() + self.timeout
            try:
                reply = await asyncio.wait_for(self._request("POST", self.url, body, deadline), self.timeout)
            except asyncio.TimeoutError:
                raise APIBaseError(f"API base {self.url} timed out after {self.timeout:g} s", url=self.url,
                                   cause="timeout") from None
            pairs = self._parse(reply, 1)[0]
            if not forced:
                return pairs
            try:
                entry = reply["choices"][0]["logprobs"]["content"][0]
                sampled, lp = self._id(entry["id"]), _as_logprob(entry["logprob"], entry.get("token"), self.url)
            except (KeyError, IndexError, TypeError):
                raise self._bad("no choices[0].logprobs.content[0].{id, logprob}", reply) from None
            if sampled != target:
                raise APIBaseError(f"API base {self.url} ignored the logit bias that forces token {target} "
                                   f"(it sampled {sampled}): cannot read that token's log-prob",
                                   url=self.url, cause="logit bias ignored")
            return [(i, v) for i, v in pairs if i != target] + [(target, lp)]

        async def one(row, start):
            async with sem:
                return [[] for _ in range(start)] + [await position(row, t) for t in range(start, len(row))]

        return await _gather_or_cancel(one(r, s) for r, s in zip(rows, starts))

    async def _score(self, rows, deadline):
        """Per row, per position t (0 .. len-1): ``[(id, logprob), ...]`` of the distribution of
        token t given the first t tokens (position 0: ``[]``)."""
        if self._batched():
            chunks = [rows[a:a + self.SCORE_CHUNK] for a in range(0, len(rows), self.SCORE_CHUNK)]

            async def batch(c):
                reply = await self._request("POST", self.url, self._score_body(c), deadline)
                return self._parse_prompt_logprobs(reply, c)

            parts = await asyncio.gather(*(batch(c) for c in chunks))
            return [p for part in parts for p in part]
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(r):
            body = self._body([self._text_prompt(r)])
            body["echo"] = True
            async with sem:
                reply = await self._request("POST", self.url, body, deadline)
            got = (reply.get("usage") or {}).get("prompt_tokens") if isinstance(reply, dict) else None
            if got is not None and got != len(r):
                raise APIBaseError(
                    f"API base {self.url} tokenised the prompt text to {got} tokens, the row has {len(r)}: its "
                    f"log-probs would be for other ids", url=self.url, cause="prompt round trip")
            return self._parse_echo(reply, r)

        return await _gather_or_cancel(one(r) for r in rows)

    def _score_body(self, rows) -> dict:
        """The batched teacher-forced scoring request (vllm, ipa-fast): the rows as token ids with
        ``prompt_logprobs=K`` instead of next-token ``logprobs``."""
        body = self._body(rows)
        body.pop("logprobs", None)
        body["prompt_logprobs"] = self.top_logprobs
        return body

    def _parse_prompt_logprobs(self, reply, rows) -> list[list[list[tuple[int, float]]]]:
        """vLLM's ``choices[i].prompt_logprobs`` (keys: ids as decimal strings, or ``token_id:N``;
        values ``{"logprob": x, ...}`` or plain numbers)."""
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            plps = [c["prompt_logprobs"] for c in choices]
        except (KeyError, TypeError, AttributeError):
            raise self._bad("no choices[i].prompt_logprobs", reply) from None
        if len(plps) != len(rows):
            raise APIBaseError(f"API base {self.url} returned {len(plps)} choices for {len(rows)} prompts",
                               url=self.url, cause="wrong entry count")
        out = []
        for r, plp in zip(rows, plps):
            if not isinstance(plp, list) or len(plp) != len(r):
                raise APIBaseError(
                    f"API base {self.url} returned prompt_logprobs for {len(plp) if isinstance(plp, list) else plp!r} "
                    f"positions, the row has {len(r)} tokens (does it support prompt_logprobs?)", url=self.url,
                    cause="malformed reply")
            per = [[]]
            for entry in plp[1:]:
                if not isinstance(entry, dict):
                    raise self._bad("a null or malformed prompt_logprobs entry after the first", reply)
                pairs = []
                for k, v in entry.items():
                    lp = v.get("logprob") if isinstance(v, dict) else v
                    if isinstance(k, str) and k.isdigit():
                        i = self._id(int(k))
                    else:
                        i = self.key_to_id(str(k), strings=False)
                    pairs.append((i, _as_logprob(lp, k, self.url)))
                per.append(pairs)
            out.append(per)
        return out

    def _parse_echo(self, reply, row) -> list[list[tuple[int, float]]]:
        """llama-cpp-python's echoed ``top_logprobs``: entry i is the distribution after
        ``row[:i + 1]`` (entry 0 null), so position t's is entry t - 1."""
        try:
            top = reply["choices"][0]["logprobs"]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise self._bad("no choices[0].logprobs.top_logprobs", reply) from None
        if not isinstance(top, list) or len(top) < len(row) - 1:
            raise APIBaseError(
                f"API base {self.url} echoed {len(top) if isinstance(top, list) else top!r} top_logprobs entries "
                f"for a {len(row)}-token prompt (does it echo prompt log-probs? llama-cpp-python needs "
                f"--logits_all true)", url=self.url, cause="malformed reply")
        per = [[], []]
        for entry in top[1:len(row) - 1]:
            if not isinstance(entry, dict):
                raise self._bad("a null or malformed echoed top_logprobs entry after the first", reply)
            pairs, seen = [], {}
            for k, v in entry.items():
                i = self.key_to_id(k, strings=True)
                if i is not None and i not in seen:
                    seen[i] = _as_logprob(v, k, self.url)
                    pairs.append((i, seen[i]))
            per.append(pairs)
        return per

    def _check_echo_alignment(self, row) -> None:
        """Once per base: the echoed entry after the whole row must be the plain next-token top-K
        of that row (the alignment :meth:`_parse_echo` assumes)."""
        body = self._body([self._text_prompt(row)])
        body["echo"] = True
        reply = self._post(body)
        try:
            last = reply["choices"][0]["logprobs"]["top_logprobs"][len(row) - 1]
        except (KeyError, IndexError, TypeError):
            raise self._bad("no echoed top_logprobs entry after the whole prompt", reply) from None
        plain_ids, plain_vals = self.top_k([row])
        echoed = {}
        for k, v in (last or {}).items():
            i = self.key_to_id(k, strings=True)
            if i is not None:
                echoed[i] = _as_logprob(v, k, self.url)
        agree = [abs(echoed[int(i)] - float(v)) <= 1e-3 for i, v in zip(plain_ids[0], plain_vals[0])
                 if math.isfinite(float(v)) and int(i) in echoed]
        if len(agree) < max(1, len(echoed) // 2) or not all(agree):
            raise APIBaseError(
                f"API base {self.url}: its echoed prompt log-probs are not aligned as expected (entry i = the "
                f"distribution after the first i + 1 tokens, as llama-cpp-python 0.3 answers); this server "
                f"version cannot be used to score sequences", url=self.url, cause="echo alignment")
        self._echo_checked = True

    async def _step(self, prompts, lengths, deadline):
        if self._batched():
            return self._parse(await self._request("POST", self.url, self._body(prompts), deadline), len(prompts))
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(p, n):
            async with sem:
                reply = await self._request("POST", self.url, self._body([p]), deadline)
            if self.dialect == "llama-cpp-python":  # the server tokenised our text: same ids count?
                got = (reply.get("usage") or {}).get("prompt_tokens") if isinstance(reply, dict) else None
                if got is not None and got != n:
                    raise APIBaseError(
                        f"API base {self.url} tokenised the prompt text to {got} tokens, the row has {n} "
                        f"(a BOS it adds, or another tokenisation): its log-probs would be for other ids",
                        url=self.url, cause="prompt round trip")
            return self._parse(reply, 1)[0]

        return await _gather_or_cancel(one(p, n) for p, n in zip(prompts, lengths))

    def _body(self, prompts) -> dict:
        K = self.top_logprobs
        d = self.dialect
        if d in ("vllm", "ipa-fast"):
            body = {"prompt": prompts, "max_tokens": 1, "logprobs": K, "temperature": 1.0, "top_p": 1.0,
                    "echo": False, "return_tokens_as_token_ids": True}
        elif d == "llama-server":
            body = {"prompt": prompts if self._batched() else prompts[0], "max_tokens": 1, "logprobs": K,
                    "temperature": 1.0, "post_sampling_probs": False, "cache_prompt": True,
                    "logit_bias": self._sample_bias()}
        else:  # llama-cpp-python
            body = {"prompt": prompts[0], "max_tokens": 1, "logprobs": K, "temperature": 0.0, "echo": False,
                    "logit_bias": self._sample_bias()}
        if self.model is not None:
            body["model"] = self.model
        body.update(self.extra_body)
        return body

    def _sample_bias(self) -> dict[str, int]:
        """-100 on every id the llama.cpp servers must not sample themselves, once per client: the
        special ids (the server would end and answer no log-probs) and, for llama-server, the ids
        whose text ends inside a UTF-8 character (it holds such text back and answers ``logprobs:
        null``; kept in :attr:`_cut_utf8`)."""
        if self._bias is None:
            if self.dialect == "llama-server":
                try:
                    self._cut_utf8 = {i for i, b in enumerate(token_bytes(self.tokenizer))
                                      if b is not None and cuts_utf8(b)}
                except ValueError:  # a tokenizer whose token bytes are unknown: the special ids only
                    self._cut_utf8 = set()
            self._bias = {str(i): -100 for i in sorted(set(_special_ids(self.tokenizer)) | self._cut_utf8)}
        return self._bias

    def _bad(self, what, reply):
        return APIBaseError(f"API base {self.url} returned {what} (does it support logprobs?): "
                            f"{json.dumps(reply)[:300]}", url=self.url, cause="malformed reply")

    def _parse(self, reply, n) -> list[list[tuple[int, float]]]:
        """``[(id, logprob), ...]`` per prompt of one reply."""
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            lps = [c["logprobs"] for c in choices]
        except (KeyError, TypeError, AttributeError):
            raise self._bad("no choices[i].logprobs.top_logprobs", reply) from None
        if len(lps) != n:
            raise APIBaseError(f"API base {self.url} returned {len(lps)} choices for {n} prompts",
                               url=self.url, cause="wrong entry count")
        out = []
        for lp in lps:
            if self.dialect == "llama-server":
                if lp is None:
                    raise APIBaseError(
                        f"API base {self.url} answered logprobs null (llama-server withholds them when its own "
                        f"sample ends inside a UTF-8 character or is not shown; is the logit_bias ignored?)",
                        url=self.url, cause="empty top_logprobs")
                try:
                    top = lp["content"][0]["top_logprobs"]
                    pairs = [(self._id(e["id"]), _as_logprob(e["logprob"], e.get("token"), self.url)) for e in top]
                except (KeyError, IndexError, TypeError):
                    raise self._bad("no choices[i].logprobs.content[0].top_logprobs[].id", reply) from None
            else:
                try:
                    top = lp["top_logprobs"]
                except (KeyError, TypeError):
                    raise self._bad("no choices[i].logprobs.top_logprobs", reply) from None
                if isinstance(top, list) and not top:
                    raise APIBaseError(
                        f"API base {self.url} returned an empty top_logprobs (the server sampled an "
                        f"end-of-generation token; is the logit_bias on it ignored?)", url=self.url,
                        cause="empty top_logprobs")
                if not isinstance(top, list) or not isinstance(top[0], dict):
                    raise self._bad("no choices[i].logprobs.top_logprobs", reply)
                pairs = []
                for k, v in top[0].items():
                    i = self.key_to_id(k, strings=self.dialect == "llama-cpp-python")
                    if i is not None:
                        pairs.append((i, _as_logprob(v, k, self.url)))
            seen = {}
            for i, v in pairs:
                if i in seen and seen[i] != v:
                    raise APIBaseError(f"API base {self.url} returned token id {i} twice with different "
                                       f"log-probs", url=self.url, cause="duplicate id")
                seen[i] = v
            out.append(list(seen.items()))
        return out

    # -- keys -> ids -----------------------------------------------------------------------------

    def _id(self, i) -> int:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size:
            raise APIBaseError(f"API base returned token id {i!r}, outside the shared vocabulary "
                               f"[0, {self.vocab_size})", url=self.url, cause="bad token id")
        return i

    def key_to_id(self, key: str, *, strings: bool = True) -> int | None:
        """``token_id:N`` -> N; with ``strings``, a printed token string -> its one id (or None
        for an ambiguous key when ``ambiguous="drop"``)."""
        if key.startswith("token_id:"):
            try:
                i = int(key[len("token_id:"):])
            except ValueError:
                raise APIBaseError(f"API base returned a malformed key {key!r}", url=self.url,
                                   cause="malformed key") from None
            return self._id(i)
        if not strings:
            raise APIBaseError(
                f"API base {self.url} returned token string {key!r} where token_id:N keys were asked for "
                f"(return_tokens_as_token_ids ignored?); ids are not guessed from strings", url=self.url,
                cause="string key")
        if self._printed is None:
            self._printed = printed_table(self.tokenizer, self.vocab_size,
                                          max_piece=LLAMA_CPP_PYTHON_PIECE if self.dialect == "llama-cpp-python" else None)
        ids = self._printed.get(key, ())
        if len(ids) == 1:
            return self._id(ids[0])
        if not ids:
            raise APIBaseError(f"API base returned token {key!r}, which is not exactly one token of the shared "
                               f"tokenizer (no token prints as it)", url=self.url, cause=f"unknown token {key!r}")
        if self.ambiguous == "drop":
            self.dropped += 1
            return None
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        raise APIBaseError(
            f"API base returned token {key!r}, which is not exactly one token of the shared tokenizer: "
            f"{len(ids)} ids print as it ({shown}); the server keys log-probs by printed strings, so it "
            f"cannot be mapped (use a server that returns ids, or ambiguous='drop')", url=self.url,
            cause=f"ambiguous token {key!r}")

    def _text_prompt(self, row: list[int]) -> str:
        tok = self.tokenizer
        ids = list(row)
        bos = tok.bos_token_id
        if self._adds_bos is None:
            self._adds_bos = _adds_bos(tok)
        if ids and bos is not None and ids[0] == bos and self._adds_bos:
            ids = ids[1:]
        text = tok.decode(ids)
        back = tok(text)["input_ids"]
        if back != row:
            raise APIBaseError(
                f"row {row[-12:]} (last 12 ids) does not survive the text round trip the llama-cpp-python "
                f"server forces (it re-tokenises {text[-40:]!r} to other ids); use llama-server or vLLM, "
                f"which take ids", url=self.url, cause="prompt round trip")
        return text

    # -- the decoding protocol TailoredLM drives -----------------------------------------------

    def _dense(self, rows, active=None) -> torch.Tensor:
        B = len(rows)
        out = torch.zeros((B, self.vocab_size), dtype=torch.float32)  # finished rows: ignored
        which = [i for i in range(B) if active is None or active[i]]
        if which:
            ids, vals = self.top_k([rows[i] for i in which])
            dense = torch.full((len(which), self.vocab_size), float("-inf")).scatter_(1, ids, vals)
            out[which] = dense
        return out

    def prefill(self, rows: list[list[int]], max_new_tokens: int) -> torch.Tensor:
        self.rows = [list(r) for r in rows]
        return self._dense(self.rows)

    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        act = None if active is None else active.tolist()
        for i, t in enumerate(tokens.tolist()):
            if act is None or act[i]:
                self.rows[i].append(t)
        return self._dense(self.rows, act)


async def _gather_or_cancel(coros):
    """``asyncio.gather`` of ``coros`` in order; the first failure cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def _as_logprob(v, key, url) -> float:
    if v is None:
        return float("-inf")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v > 1e-3:
        raise APIBaseError(f"API base {url} returned a bad log-prob {v!r} for {key!r}", url=url,
                           cause="bad log-prob")
    return float(v)


def _special_ids(tokenizer) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(i for i in ids if i is not None and i >= 0)


def cuts_utf8(b: bytes) -> bool:
    """True when ``b`` ends inside a multi-byte UTF-8 character, by llama.cpp server's rule
    (``validate_utf8``): a lead byte among the last four needs more bytes than follow it."""
    n = len(b)
    for i in range(1, min(4, n) + 1):
        c = b[n - i]
        if (c & 0xE0) == 0xC0 and i < 2 or (c & 0xF0) == 0xE0 and i < 3 or (c & 0xF8) == 0xF0 and i < 4:
            return True
    return False


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes | None]:
    """The bytes each id stands for (None: a special/control token). Byte-level BPE (GPT-2,
    Llama 3, SmolLM) and SentencePiece with byte fallback (``<0xNN>``, ``▁``) are exact; other
    tokenizers raise ValueError."""
    V = len(tokenizer) if vocab_size is None else vocab_size
    special = set(_special_ids(tokenizer))
    added = {int(i): t for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(V)))
    dec = _byte_decoder()
    plain = [p for i, p in enumerate(pieces) if i not in added and p is not None]
    byte_level = all(c in dec for p in plain for c in p)
    out: list[bytes | None] = []
    for i, p in enumerate(pieces):
        if i in special or p is None:
            out.append(None)
        elif i in added:
            out.append(str(added[i].content if hasattr(added[i], "content") else added[i]).encode())
        elif byte_level:
            out.append(bytes(dec[c] for c in p))
        elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            out.append(bytes([int(p[3:5], 16)]))
        elif "\ufffd" not in p:
            out.append(p.replace("\u2581", " ").encode())
        else:
            raise ValueError(f"cannot tell the bytes of token {i} ({p!r}) of this tokenizer")
    return out


def printed_table(tokenizer, vocab_size: int | None = None, max_piece: int | None = None) -> dict[str, list[int]]:
    """String -> every id printing as it, as a llama.cpp-based server prints tokens: the token's
    bytes decoded as UTF-8 with invalid bytes dropped; control tokens print ``""``, and so do
    tokens longer than ``max_piece`` bytes (llama-cpp-python 0.3.x detokenizes each token into a
    32-byte buffer and prints nothing for a longer one)."""
    table: dict[str, list[int]] = {}
    for i, b in enumerate(token_bytes(tokenizer, vocab_size)):
        if b is not None and max_piece is not None and len(b) > max_piece:
            b = None
        s = "" if b is None else b.decode("utf-8", errors="ignore")
        table.setdefault(s, []).append(i)
    return table
