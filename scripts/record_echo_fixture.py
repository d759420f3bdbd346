"""Record tests/fixtures/engines/llama_cpp_python_echo.json: how llama-cpp-python's server answers
the teacher-forced scoring request of ``APIBase.score_top_k`` (``echo: true`` + ``logprobs``),
with the engine's own per-position answer (``truth``) computed in-process from the ids.

    make test-engines   # once: builds ~/.cache/ipa_fast/engines-venv and fetches the GGUF
    .venv/bin/python -m scripts.record_echo_fixture   # from the repository root (it imports the tests' helper)

Exchanges: ``GET /v1/models`` and ``/props`` (dialect detection), the echo request (the body
APIBase sends) and the plain next-token request of the same row (APIBase checks the echo
alignment against it once). ``truth[t]``: for every position t >= 1 of the row, the engine's
top K + 5 ids and log-probs of the distribution of token t given the tokens before it, and the
log-prob of the row's token t itself.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from tests.fixtures.engines.live import GGUF, ENGINE_VENV, HERE, LlamaCppPythonServer, load_tokenizer

TEXT = "Once upon a time, there was a little"
K = 20

ENGINE_SIDE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
args = json.loads(sys.stdin.read())
llm = Llama(model_path=args["gguf"], n_ctx=512, logits_all=True, n_threads=1, seed=0, verbose=False)
row = args["row"]
llm.reset()
llm.eval(row)
truth = []
for t in range(1, len(row)):
    lp = Llama.logits_to_logprobs(np.array(llm.scores[t - 1]))
    top = np.argsort(-lp, kind="stable")[: args["k"] + 5]
    truth.append({"position": t, "token": row[t], "token_logprob": float(lp[row[t]]),
                  "top": [[int(i), float(lp[i])] for i in top]})
print(json.dumps(truth))
"""


def main(argv=None) -> None:
    import httpx

    from ipa_fast.decoding.api_base import APIBase

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-python", default=str(ENGINE_VENV / "bin" / "python"))
    p.add_argument("--gguf", default=str(GGUF))
    p.add_argument("--out", default=str(HERE / "llama_cpp_python_echo.json"))
    args = p.parse_args(argv)
    tok = load_tokenizer()
    row = tok(TEXT)["input_ids"]
    truth = json.loads(subprocess.run([args.engine_python, "-c", ENGINE_SIDE], input=json.dumps(
        {"gguf": args.gguf, "row": row, "k": K}), capture_output=True, text=True, check=True, timeout=900).stdout)
    version = subprocess.run([args.engine_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    exchanges = []
    with LlamaCppPythonServer(Path(args.gguf), python=args.engine_python) as server:
        client = httpx.Client(timeout=120, trust_env=False)

        def record(method, path, body=None, **extra):
            r = client.request(method, server.url + path, json=body)
            try:
                reply = r.json()
            except ValueError:
                reply = r.text
            exchanges.append({"request": {"method": method, "path": path, **({"body": body} if body is not None else {})},
                              "response": {"status": r.status_code, "body": reply}, **extra})

        record("GET", "/v1/models")
        record("GET", "/props")
        api = APIBase(server.url, tok, top_logprobs=K, dialect="llama-cpp-python")
        plain = api._body([api._text_prompt(row)])
        record("POST", "/v1/completions", dict(plain, echo=True), name="echo")
        record("POST", "/v1/completions", plain, name="plain")
        record("POST", "/extras/tokenize", {"input": TEXT}, name="tokenize")
        api.close()
    fixture = {"engine": "llama-cpp-python", "dialect": "llama-cpp-python", "recorded": True,
               "engine_version": version, "model": Path(args.gguf).name, "top_logprobs": K,
               "command": "scripts/record_echo_fixture.py", "text": TEXT, "row": row, "start": 2,
               "truth": truth, "exchanges": exchanges}
    Path(args.out).write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {len(row)} tokens, {len(exchanges)} exchanges")


if __name__ == "__main__":
    main()
