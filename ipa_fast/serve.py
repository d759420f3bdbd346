"""A small OpenAI-compatible completions server for a local Hugging Face model (stdlib only).

    python -m ipa_fast.serve --model path/to/base --port 8000 [--max-logprobs 20]
    # then: APIBase("http://127.0.0.1:8000/v1", tokenizer) as the base of a TailoredLM

or in Python (tests do this):

    with CompletionServer(model, tokenizer) as server:   # 127.0.0.1, a free port
        base = APIBase(server.url, tokenizer)

``POST /v1/completions`` takes ``prompt`` (a string, a list of ids, or a list of either),
``max_tokens``, ``temperature`` (0 = greedy), ``logprobs`` (top-k per generated token),
``return_tokens_as_token_ids`` (keys ``token_id:N``, as vLLM) and ``seed``; ``echo`` is not
supported. Each request is recomputed without a cache (the point is a faithful, tiny
reference server, not speed: use vLLM or llama.cpp for big bases). ``GET /v1/models`` lists
the model.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .decoding import left_pad


class BadRequest(ValueError):
    pass


class CompletionServer:
    """Serve ``model`` (a HF causal LM) on ``host:port`` (port 0 = a free one) in a thread."""

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "ipa-fast-local", max_logprobs: int = 20, vocab_size: int | None = None):
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.max_logprobs = max_logprobs
        out = model.get_output_embeddings()
        n_out = out.weight.shape[0] if out is not None else model.config.vocab_size
        self.V = vocab_size or min(len(tokenizer), n_out)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "CompletionServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- the completion itself -----------------------------------------------------------------

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer(prompt)["input_ids"]]
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            rows = []
            for p in prompt:
                if isinstance(p, str):
                    rows.append(self.tokenizer(p)["input_ids"])
                elif isinstance(p, list) and p and all(isinstance(x, int) for x in p):
                    rows.append(p)
                else:
                    raise BadRequest("prompt entries must be strings or non-empty lists of token ids")
            if any(not r or min(r) < 0 or max(r) >= self.V for r in rows):
                raise BadRequest(f"prompt token ids must be in [0, {self.V})")
            return rows
        raise BadRequest("prompt must be a string, a list of token ids, or a non-empty list of either")

    def _key(self, i: int, as_ids: bool) -> str:
        return f"token_id:{i}" if as_ids else self.tokenizer.decode([i])

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        rows = self._prompts(body.get("prompt"))
        max_tokens = int(body.get("max_tokens", 16))
        k = body.get("logprobs")
        temperature = float(body.get("temperature", 1.0))
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        if body.get("echo"):
            raise BadRequest("echo is not supported by this server")
        if max_tokens < 1:
            raise BadRequest("max_tokens must be >= 1")
        if k is not None and not (isinstance(k, int) and 0 <= k <= self.max_logprobs):
            raise BadRequest(f"logprobs must be an int in [0, {self.max_logprobs}]")
        if temperature < 0:
            raise BadRequest("temperature must be >= 0")
        gen = torch.Generator().manual_seed(int(body.get("seed", 0) or 0))
        rows = [list(r) for r in rows]
        out = [{"tokens": [], "token_logprobs": [], "top_logprobs": []} for _ in rows]
        with self._lock:
            for _ in range(max_tokens):
                ids, mask = left_pad(rows, self.pad_id, self.device)
                pos = (mask.cumsum(1) - 1).clamp_(min=0)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                    use_cache=False, logits_to_keep=1).logits[:, -1, :self.V].float()
                logprobs = torch.log_softmax(logits, dim=-1).cpu()
                if temperature == 0:
                    nxt = logprobs.argmax(-1)
                else:
                    nxt = torch.multinomial(torch.softmax(logprobs / temperature, -1), 1, generator=gen).view(-1)
                for i, r in enumerate(rows):
                    t = int(nxt[i])
                    r.append(t)
                    out[i]["tokens"].append(self._key(t, as_ids))
                    out[i]["token_logprobs"].append(float(logprobs[i, t]))
                    if k:
                        vals, top = logprobs[i].topk(k)
                        out[i]["top_logprobs"].append(
                            {self._key(int(j), as_ids): float(v) for j, v in zip(top.tolist(), vals.tolist())})
        n_prompt = sum(len(r) - max_tokens for r in rows)
        choices = []
        for i, r in enumerate(rows):
            gen_ids = r[-max_tokens:]
            choices.append({"index": i, "text": self.tokenizer.decode(gen_ids),
                            "logprobs": out[i] if k is not None else None, "finish_reason": "length"})
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": max_tokens * len(rows),
                          "total_tokens": n_prompt + max_tokens * len(rows)}}


def _handler(server: CompletionServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self._send(200, server.complete(body))
            except (BadRequest, json.JSONDecodeError, TypeError, ValueError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            except Exception as e:  # a server must answer, not hang the client
                self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})
    return Handler


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m ipa_fast.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model name or local path")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-logprobs", type=int, default=20)
    args = p.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    server = CompletionServer(model, tok, host=args.host, port=args.port, model_name=args.model,
                              max_logprobs=args.max_logprobs)
    print(f"serving {args.model} at {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
