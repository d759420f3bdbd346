"""A base LM reachable only over an OpenAI-compatible completions endpoint with top-k log-probs.

    base = APIBase("http://127.0.0.1:8000/v1", tokenizer, model="my-base", top_logprobs=20)
    lm = TailoredLM(base, adapter, tokenizer)            # the adapter runs locally
    lm.generate(["The cat"], max_new_tokens=32, top_p=0.9, seed=0)

Each decoding step sends one request: the rows' token ids so far (prompt ids + generated ids,
never re-tokenised text) with ``max_tokens=1, logprobs=K``; the server's prefix cache (vLLM's,
llama.cpp's) makes that incremental. The returned ``top_logprobs`` keys are mapped back to ids
via the ``token_id:N`` form (vLLM's ``return_tokens_as_token_ids``, which is requested) or the
exact token strings of the shared tokenizer; an unmappable key is an error, not a guess. The
base is then dense with ``-inf`` outside its top-k (SPEC §2 sparse base): the tailored policy can
re-rank the base's top-k, never add tokens outside it.
"""
from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request

import torch


class APIBaseError(RuntimeError):
    """The API base could not be used: server down, timeout, HTTP error, malformed reply."""


def completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


class APIBase:
    """Top-k next-token log-probs from an OpenAI-compatible ``/v1/completions`` server.

    ``url``: the server (``http://host:port``, ``.../v1`` or the full completions URL).
    ``tokenizer``: the shared tokenizer (maps string keys back to ids). ``top_logprobs``: K.
    ``timeout``: seconds per request. ``batch``: send all rows in one request (``prompt`` as a
    list of id lists, as vLLM accepts); False sends one request per row.
    """

    def __init__(self, url: str, tokenizer, *, model: str | None = None, top_logprobs: int = 20,
                 timeout: float = 30.0, api_key: str | None = None, batch: bool = True,
                 extra_body: dict | None = None):
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        self.url = completions_url(url)
        self.tokenizer = tokenizer
        self.model = model
        self.top_logprobs = top_logprobs
        self.timeout = timeout
        self.api_key = api_key
        self.batch = batch
        self.extra_body = dict(extra_body or {})
        self.vocab_size = len(tokenizer)
        self.device = torch.device("cpu")
        self.requests = 0  # how many HTTP requests were sent (for benchmarks / tests)
        self._string_ids = None

    # -- HTTP ----------------------------------------------------------------------------------

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise APIBaseError(f"API base {self.url} answered HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise APIBaseError(f"API base {self.url} timed out after {self.timeout} s") from None
            raise APIBaseError(f"cannot reach API base {self.url}: {e.reason}") from None
        except (socket.timeout, TimeoutError):
            raise APIBaseError(f"API base {self.url} timed out after {self.timeout} s") from None
        except (ConnectionError, OSError) as e:
            raise APIBaseError(f"cannot reach API base {self.url}: {e}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIBaseError(f"API base {self.url} returned malformed JSON: {raw[:200]!r}") from None

    def top_k(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token top-k of each row: ``(ids [B, K] int64, logprobs [B, K] float32)``.

        A reply with fewer than K entries is padded with copies of its first entry."""
        if self.batch:
            tops = self._request(rows)
        else:
            tops = [t for r in rows for t in self._request([r])]
        K = self.top_logprobs
        ids = torch.zeros((len(rows), K), dtype=torch.long)
        vals = torch.full((len(rows), K), float("-inf"))
        for i, top in enumerate(tops):
            pairs = [(self.key_to_id(k), _as_logprob(v, k, self.url)) for k, v in top.items()][:K]
            if not pairs:
                raise APIBaseError(f"API base {self.url} returned empty top_logprobs")
            # A short reply is padded by repeating its first entry, so a scatter writes it twice
            # with the same value (never a stray -inf over a real entry).
            pairs += [pairs[0]] * (K - len(pairs))
            ids[i] = torch.tensor([p[0] for p in pairs])
            vals[i] = torch.tensor([p[1] for p in pairs])
        return ids, vals

    def _request(self, rows):
        body = {"prompt": [list(map(int, r)) for r in rows], "max_tokens": 1, "logprobs": self.top_logprobs,
                "temperature": 1.0, "top_p": 1.0, "echo": False, "return_tokens_as_token_ids": True,
                **self.extra_body}
        if self.model is not None:
            body["model"] = self.model
        reply = self._post(body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            tops = [c["logprobs"]["top_logprobs"][0] for c in choices]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise APIBaseError(f"API base {self.url} returned no choices[i].logprobs.top_logprobs "
                               f"(does it support logprobs?): {json.dumps(reply)[:300]}") from None
        if len(tops) != len(rows) or not all(isinstance(t, dict) for t in tops):
            raise APIBaseError(f"API base {self.url} returned {len(tops)} top_logprobs for {len(rows)} prompts")
        return tops

    # -- keys → ids ----------------------------------------------------------------------------

    def key_to_id(self, key: str) -> int:
        """``token_id:N`` → N; else the exact (decoded or raw) token string of one vocabulary id."""
        if key.startswith("token_id:"):
            try:
                i = int(key[len("token_id:"):])
            except ValueError:
                raise APIBaseError(f"API base returned a malformed key {key!r}") from None
        else:
            if self._string_ids is None:
                self._string_ids = self._build_string_ids()
            i = self._string_ids.get(key)
            if i is None:
                raise APIBaseError(
                    f"API base returned token {key!r}, which is not exactly one token of the shared tokenizer "
                    f"(ask the server for token ids, e.g. vLLM's return_tokens_as_token_ids)")
        if not 0 <= i < self.vocab_size:
            raise APIBaseError(f"API base returned token id {i}, outside the shared vocabulary [0, {self.vocab_size})")
        return i

    def _build_string_ids(self) -> dict[str, int]:
        # Decoded strings (what servers print) that identify one id; ambiguous ones are dropped
        # so they raise instead of being guessed. Raw vocabulary strings come second.
        decoded: dict[str, int | None] = {}
        for i in range(self.vocab_size):
            s = self.tokenizer.decode([i])
            decoded[s] = None if s in decoded else i
        table = {s: i for s, i in decoded.items() if i is not None}
        for s, i in self.tokenizer.get_vocab().items():
            if i < self.vocab_size:
                table.setdefault(s, i)
        return table

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


def _as_logprob(v, key, url) -> float:
    if v is None:
        return float("-inf")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v > 1e-3:
        raise APIBaseError(f"API base {url} returned a bad log-prob {v!r} for {key!r}")
    return float(v)
