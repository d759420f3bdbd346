"""Training against a served base (``ipa-fast train --api-base URL``): teacher-forced scoring by
an API base (:meth:`APIBase.score_top_k`) against the model's own forward, a few PPO / Quark
steps against the bundled server (full-vocabulary top-K) against the same run with the local
base, the per-sequence cache, replayed vLLM / llama-cpp-python prompt-log-prob replies, and
bad input. Tiny random models (tests/tiny_models.py), 127.0.0.1 only, no downloads."""
import json
import math
import time
from pathlib import Path

import pytest
import torch

from ipa_fast.decoding.api_base import APIBase, APIBaseError
from ipa_fast.decoding.serve import CompletionServer
from ipa_fast.training import TrainConfig, Trainer, train
from ipa_fast.training.policy import _sparse_rows
from tiny_models import make_tiny_pair

from fixtures.engines.replay import FakeEngine, json_reply, replay_routes

HERE = Path(__file__).resolve().parent / "fixtures" / "engines"
PROMPTS = ["the cat", "a dog", "we play", "birds sing", "she writes", "he cooks", "people walk", "hello"]

pytestmark = pytest.mark.usefixtures("one_thread")


def llama_pair():
    """A tiny random Llama base + GPT-2 adapter, flatter heads so sampling explores."""
    base, adapter, tok = make_tiny_pair(seed=0, base_arch="llama")
    with torch.no_grad():
        base.get_output_embeddings().weight.div_(8)
        adapter.get_output_embeddings().weight.div_(8)
    return base, adapter, tok


@pytest.fixture(scope="module")
def served():
    base, adapter, tok = llama_pair()
    with CompletionServer(base, tok, max_logprobs=len(tok)) as server:
        yield base, adapter, tok, server


# -- (a) score_top_k against the model's own forward ---------------------------------------------

@pytest.mark.parametrize("K", [4, 64])
def test_score_top_k_is_the_models_log_softmax_at_every_position(served, K):
    base, _, tok, server = served
    V = len(tok)
    rows = [tok(t)["input_ids"] for t in ("the cat sat on the mat", "a dog runs", "Hello world, this is")]
    starts = [1, 2, len(rows[2]) - 1]
    api = APIBase(server.url, tok, top_logprobs=K)
    got = api.score_top_k(rows, starts)
    assert api.requests == 1  # all rows in one request
    outside = 0
    for r, s, (ids, vals, chosen) in zip(rows, starts, got):
        with torch.no_grad():  # independent reference: one unpadded forward of this row alone
            lp = torch.log_softmax(base(torch.tensor([r])).logits[0, :, :V].double(), -1)
        assert ids.shape == vals.shape == (len(r) - s, K) and chosen.shape == (len(r) - s,)
        for j, t in enumerate(range(s, len(r))):
            ref_v, ref_i = lp[t - 1].topk(K)
            assert ids[j].tolist() == ref_i.tolist()
            torch.testing.assert_close(vals[j].double(), ref_v, atol=2e-5, rtol=0)
            assert chosen[j].item() == pytest.approx(lp[t - 1, r[t]].item(), abs=2e-5)
            outside += r[t] not in ref_i.tolist()
        # the sparse base of the scored row: -inf outside top-K and the token itself
        dense = _sparse_rows(r[s:], ids, vals, chosen, V)
        for j, t in enumerate(range(s, len(r))):
            support = set(ids[j].tolist()) | {r[t]}
            finite = set(torch.isfinite(dense[j]).nonzero().view(-1).tolist())
            assert finite == support
            assert dense[j, r[t]].item() == pytest.approx(lp[t - 1, r[t]].item(), abs=2e-5)
    if K == 4:
        assert outside > 0  # the chosen-token path outside the top-K was exercised


def test_score_top_k_bad_start(served):
    _, _, tok, server = served
    api = APIBase(server.url, tok, top_logprobs=4)
    with pytest.raises(ValueError, match=r"start of row 0 must be in \[1, 3\]"):
        api.score_top_k([[5, 6, 7]], 0)
    assert [x[0].shape for x in api.score_top_k([[5, 6, 7]], 3)] == [(0, 4)]


def fake_llama_server(model, tok, held=(), ignore_bias=False):
    """llama-server's next-token reply, computed from ``model``: raw log-softmax top-K of the id
    prompt, the server's own sample the argmax of logits + logit_bias (greedy), and ``logprobs:
    null`` when that sample is in ``held`` (a token ending inside a UTF-8 character)."""
    V = len(tok)

    def answer(body):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([body["prompt"]])).logits[0, -1, :V].double(), -1)
        bias = torch.zeros(V, dtype=torch.double)
        for k, v in ({} if ignore_bias else body.get("logit_bias", {})).items():
            bias[int(k)] = v
        sampled = int((lp + bias).argmax())
        if sampled in held:
            return json_reply(200, {"choices": [{"text": "\ufffd", "index": 0, "logprobs": None}]})
        vals, ids = lp.topk(body["logprobs"])
        entry = lambda i, v: {"id": int(i), "token": tok.decode([int(i)]), "bytes": [], "logprob": float(v)}
        top = [entry(i, v) for i, v in zip(ids.tolist(), vals.tolist())]
        return json_reply(200, {"choices": [{"text": "", "index": 0, "logprobs": {
            "content": [dict(entry(sampled, lp[sampled]), top_logprobs=top)]}}]})

    models = json_reply(200, {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "llamacpp"}]})
    return {("GET", "/v1/models"): [models], ("POST", "/v1/completions"): [answer]}


def test_score_top_k_llama_server_one_request_per_position(served):
    """llama-server has no prompt log-probs: one next-token request per scored position, the
    server's sample forced onto the row's token (+100) so its log-prob comes back also outside
    the top-K; against the model's own forward."""
    base, _, tok, _ = served
    V, K = len(tok), 4
    rows = [tok(t)["input_ids"] for t in ("the cat sat on the mat", "a dog runs")]
    starts = [1, 2]
    with FakeEngine(fake_llama_server(base, tok)) as fake:
        api = APIBase(fake.url, tok, top_logprobs=K)
        got = api.score_top_k(rows, starts)
        sent = [b for m, _, b in fake.log if m == "POST"]
        api.close()
    assert api.dialect == "llama-server" and len(sent) == sum(len(r) - s for r, s in zip(rows, starts))
    by_prompt = {tuple(b["prompt"]): b for b in sent}  # rows go concurrently, positions in order
    outside = 0
    for r, s, (ids, vals, chosen) in zip(rows, starts, got):
        with torch.no_grad():
            lp = torch.log_softmax(base(torch.tensor([r])).logits[0, :, :V].double(), -1)
        for j, t in enumerate(range(s, len(r))):
            ref_v, ref_i = lp[t - 1].topk(K)
            assert ids[j].tolist() == ref_i.tolist()
            torch.testing.assert_close(vals[j].double(), ref_v, atol=2e-5, rtol=0)
            assert chosen[j].item() == pytest.approx(lp[t - 1, r[t]].item(), abs=2e-5)
            assert by_prompt[tuple(r[:t])]["logit_bias"][str(r[t])] == 100
            outside += r[t] not in ref_i.tolist()
    assert outside > 0


def test_score_top_k_llama_server_held_back_and_ignored_bias(served):
    """A row token the server would hold back is not forced (its log-prob only from inside the
    top-K, else NaN); a server that ignores the bias is a one-line error naming the token."""
    base, _, tok, _ = served
    from ipa_fast.decoding.api_base import cuts_utf8, token_bytes

    held = [i for i, b in enumerate(token_bytes(tok)) if b is not None and cuts_utf8(b)]
    assert held
    row = tok("the cat")["input_ids"] + [held[0]]
    with FakeEngine(fake_llama_server(base, tok, held=set(held))) as fake:
        api = APIBase(fake.url, tok, top_logprobs=4)
        ids, vals, chosen = api.score_top_k([row], len(row) - 1)[0]
        sent = [b for m, _, b in fake.log if m == "POST"][-1]
        api.close()
    assert sent["logit_bias"][str(held[0])] == -100 and ids.shape == (1, 4)
    assert math.isnan(chosen[0]) or held[0] in ids[0].tolist()
    with FakeEngine(fake_llama_server(base, tok, ignore_bias=True)) as fake:
        api = APIBase(fake.url, tok, top_logprobs=4)
        r = tok("the cat sat on the mat")["input_ids"]
        with pytest.raises(APIBaseError, match="ignored the logit bias that forces token"):
            api.score_top_k([r], 1)
        api.close()


def test_bundled_server_prompt_logprobs_limits(served):
    _, _, tok, server = served
    api = APIBase(server.url, tok)
    for body, msg in [({"prompt": [5, 6], "prompt_logprobs": len(tok) + 1}, "prompt_logprobs must be an int"),
                      ({"prompt": [5, 6], "prompt_logprobs": True}, "prompt_logprobs must be an int"),
                      ({"prompt": [5, 6], "echo": "yes"}, "echo must be a boolean")]:
        with pytest.raises(APIBaseError, match=msg) as e:
            api._post({"max_tokens": 1, **body})
        assert e.value.status == 400
    small = CompletionServer(served[0], tok, max_logprobs=8, max_prompt_logprob_entries=20)
    with small:
        with pytest.raises(APIBaseError, match="exceed this server's limit of 20") as e:
            APIBase(small.url, tok)._post({"prompt": [5, 6, 7, 8], "prompt_logprobs": 8, "max_tokens": 1})
        assert e.value.status == 400
        # echo: the prompt's tokens first (first entry null), as vLLM answers
        reply = APIBase(small.url, tok)._post({"prompt": [5, 6, 7], "echo": True, "logprobs": 2, "max_tokens": 1,
                                               "return_tokens_as_token_ids": True})
        ch = reply["choices"][0]
        assert ch["logprobs"]["tokens"][:3] == ["token_id:5", "token_id:6", "token_id:7"]
        assert ch["logprobs"]["token_logprobs"][0] is None and len(ch["logprobs"]["token_logprobs"]) == 4
        assert ch["prompt_logprobs"][0] is None and "6" in ch["prompt_logprobs"][1]


# -- (b) training against the served base = training against the local base -----------------------

def even_tokens(prompts, completions, completion_ids):
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]


def config(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), steps=2, batch_size=8, minibatch_size=4, max_new_tokens=6,
                eval_every=0, eval_size=4, eval_max_new_tokens=6, progress=False, backend="reference",
                checkpoint_every=1, min_new_tokens=2, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("algo", ["ppo", "quark"])
def test_training_against_the_served_base_matches_the_local_base(tmp_path, served, algo):
    _, _, tok, server = served
    rows = [{"prompt": p} for p in PROMPTS]
    records = {}
    for name in ("local", "api"):
        base, adapter, _ = llama_pair()
        if name == "api":
            base = APIBase(server.url, tok, top_logprobs=len(tok))  # K = V: the sparse base is dense
        tr = Trainer(config(tmp_path, name, algo=algo), base, adapter, tok, even_tokens, rows, rows[:4])
        records[name] = [tr.train_step() for _ in range(2)]
        if name == "api":
            # scored once per sequence per step (PPO: 4 epochs x 2 minibatches reuse it)
            assert 0 < tr.policy.base_rows_scored <= 2 * 8
    for a, b in zip(records["local"], records["api"]):
        keys = sorted(k for k in a if not k.startswith("time/") and isinstance(a[k], float))
        assert keys == sorted(k for k in b if not k.startswith("time/") and isinstance(b[k], float))
        assert len(keys) > 5
        for k in keys:
            assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-5), (k, a[k], b[k])


def test_cache_asks_each_sequence_once(served):
    base, adapter, tok, server = served
    from ipa_fast.training.policy import Policy
    api = APIBase(server.url, tok, top_logprobs=8)
    pol = Policy(api, adapter, tok, alpha=1.0, base_cache_size=3)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    resp = [[5, 6], [7], [8, 9, 10], [11, 12]]
    first = pol.token_stats(prompts, [[]] * 4, resp)
    n = api.requests
    assert pol.base_rows_scored == 4 and len(pol._base_cache) == 3
    again = pol.token_stats(prompts[1:], [[]] * 3, resp[1:])  # all three cached
    assert api.requests == n and pol.base_rows_scored == 4
    torch.testing.assert_close(again["logprob"], first["logprob"][1:])
    # the local twin: the same teacher-forced policy with the in-process base reduced to top-8
    # plus the token itself
    V = len(tok)
    lp = []
    with torch.no_grad():
        for p, r in zip(prompts, resp):
            full = torch.tensor([p + r])
            zb = torch.log_softmax(base(full).logits[0, len(p) - 1:-1, :V], -1)
            za = adapter(full).logits[0, len(p) - 1:-1, :V]
            top = zb.topk(8).indices
            keep = torch.zeros_like(zb, dtype=torch.bool).scatter_(1, top, True)
            keep[torch.arange(len(r)), torch.tensor(r)] = True
            z = torch.where(keep, zb, float("-inf")) + za
            lp.append(torch.log_softmax(z, -1)[torch.arange(len(r)), torch.tensor(r)])
    m = first["mask"].bool()
    torch.testing.assert_close(first["logprob"][m], torch.cat(lp), atol=1e-4, rtol=0)


# -- (c) replayed engine replies (recorded from the real servers: see the README there) -------------------

def _fixture(name):
    return json.loads((HERE / name).read_text())


def test_vllm_prompt_logprobs_replayed():
    """Recorded from vLLM's CPU build: the scoring request is the recorded body (all rows, token
    ids, ``prompt_logprobs`` K, no ``logprobs``), and at every scored position the client returns
    the reply's K best entries by value and the row's own token's log-prob, which vLLM lists
    with its rank also outside the top K."""
    from fixtures.engines.live import load_tokenizer
    tok = load_tokenizer()
    fx = _fixture("vllm_prompt_logprobs.json")
    K, rows, starts = fx["top_logprobs"], fx["rows"], fx["starts"]
    assert fx["recorded"]
    with FakeEngine(replay_routes(fx)) as fake:
        api = APIBase(fake.url + "/v1", tok, top_logprobs=K)
        got = api.score_top_k(rows, starts)
        body = fake.log[-1][2]
    assert body["prompt"] == rows and body["prompt_logprobs"] == K
    assert "logprobs" not in body
    reply = next(e for e in fx["exchanges"] if e.get("name") == "prompt-logprobs")["response"]["body"]
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    outside = 0
    for (ids, vals, chosen), row, start, choice in zip(got, rows, starts, choices):
        plp = choice["prompt_logprobs"]
        assert plp[0] is None and ids.shape == (len(row) - start, K)
        for j, t in enumerate(range(start, len(row))):
            entry = {int(k): v["logprob"] for k, v in plp[t].items()}
            top = sorted(entry.items(), key=lambda e: -e[1])[:K]
            assert ids[j].tolist() == [i for i, _ in top]
            assert vals[j].tolist() == pytest.approx([v for _, v in top], abs=1e-6)
            assert chosen[j].item() == pytest.approx(entry[row[t]], abs=1e-6)
            outside += row[t] not in ids[j].tolist()
    assert outside > 0  # some scored tokens lie outside the top K: their log-probs still come back


def test_llama_cpp_python_echo_replayed():
    """Recorded from the real server (scripts/record_echo_fixture.py): every (id, log-prob) the
    client maps at position t is the engine's own for the distribution of token t (computed
    in-process from the ids), the engine's unambiguous top-K is all there, and the token's own
    log-prob is the engine's wherever the client reports it."""
    from fixtures.engines.live import load_tokenizer
    tok = load_tokenizer()
    fx = _fixture("llama_cpp_python_echo.json")
    K, row, start = fx["top_logprobs"], fx["row"], fx["start"]
    with FakeEngine(replay_routes(fx)) as fake:
        api = APIBase(fake.url, tok, top_logprobs=K, ambiguous="drop")
        ids, vals, chosen = api.score_top_k([row], start)[0]
        sent = [b for m, p, b in fake.log if p == "/v1/completions"]
    assert all(b["prompt"] == fx["text"] for b in sent)
    assert [b["echo"] for b in sent] == [True, False, True]  # alignment check, its plain twin, the scoring
    unique = {ids_[0] for ids_ in api._printed.values() if len(ids_) == 1}  # ids a printed key maps to
    assert ids.shape == (len(row) - start, K)
    for j, t in enumerate(range(start, len(row))):
        truth = next(x for x in fx["truth"] if x["position"] == t)
        known = dict((i, v) for i, v in truth["top"])
        known[row[t]] = truth["token_logprob"]
        kth = truth["top"][K - 1][1]
        for i, v in zip(ids[j].tolist(), vals[j].tolist()):
            if i in known:
                assert v == pytest.approx(known[i], abs=1e-4), (t, i, v, known[i])
            else:
                assert v < kth
        top_k = [i for i, _ in truth["top"][:K] if i in unique]
        assert set(top_k) <= set(ids[j].tolist()), t
        if not math.isnan(chosen[j]):
            assert chosen[j].item() == pytest.approx(truth["token_logprob"], abs=1e-4)
        elif row[t] in top_k:
            raise AssertionError(f"position {t}: its token is in the top-K but no own log-prob was reported")


def test_llama_cpp_python_misaligned_echo_is_refused():
    """A server whose echoed entry i is the distribution of token i (not after it) fails the
    one-time alignment check instead of training on shifted log-probs."""
    from fixtures.engines.live import load_tokenizer
    tok = load_tokenizer()
    fx = _fixture("llama_cpp_python_echo.json")
    routes = replay_routes(fx)
    echo = next(e for e in fx["exchanges"] if e.get("name") == "echo")["response"]["body"]
    shifted = json.loads(json.dumps(echo))
    top = shifted["choices"][0]["logprobs"]["top_logprobs"]
    shifted["choices"][0]["logprobs"]["top_logprobs"] = [None] + top[:-1]
    plain = routes[("POST", "/v1/completions")][0]
    routes[("POST", "/v1/completions")] = [lambda b: json_reply(200, shifted) if b.get("echo") else plain(b)]
    with FakeEngine(routes) as fake:
        api = APIBase(fake.url, tok, top_logprobs=fx["top_logprobs"], ambiguous="drop")
        with pytest.raises(APIBaseError, match="not aligned as expected"):
            api.score_top_k([fx["row"]], fx["start"])


# -- (d) bad input ---------------------------------------------------------------------------------

def test_api_base_with_base_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="api_base and base are mutually exclusive"):
        TrainConfig(api_base="http://127.0.0.1:1/v1", base="some/base").validate()
    with pytest.raises(ValueError, match="api_base must be an http"):
        TrainConfig(api_base="127.0.0.1:8000").validate()
    with pytest.raises(ValueError, match="api_dialect must be one of"):
        TrainConfig(api_base="http://x/v1", api_dialect="tgi").validate()


def reward_file(tmp_path) -> str:
    path = tmp_path / "even_reward.py"
    path.write_text("def even(prompts, completions, completion_ids):\n"
                    "    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]\n")
    return f"{path}:even"


def _cli(argv, capsys):
    from ipa_fast.cli.main import main
    capsys.readouterr()  # drop what the setup printed
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, "\n".join(ln for ln in err.splitlines() if "error" in ln)  # not transformers' progress bars


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tiny_models import save_tiny_pair
    base_dir, adapter_dir = save_tiny_pair(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = ["train", "--reward", reward_file(tmp_path), "--prompts", str(prompts),
              "--adapter", str(adapter_dir), "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"]
    code, err = _cli(common + ["--api-base", "http://127.0.0.1:9/v1", "--base", str(base_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "mutually exclusive" in err
    code, err = _cli(common + ["--api-base", "http://127.0.0.1:9/v1", "--api-timeout", "3"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "cannot reach API base http://127.0.0.1:9" in err
    code, err = _cli(common + ["--api-base", "http://127.0.0.1:9/v1", "--api-ambiguous", "guess"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--api-ambiguous" in err and "guess" in err


def test_connect_passes_the_ambiguous_policy_on(served):
    """``api_ambiguous`` reaches the client (the replayed llama-cpp-python test shows what "drop" does);
    a bad value fails in the config's one-line check."""
    from ipa_fast.training import TrainConfig
    from ipa_fast.training.loading import connect_api_base
    _, _, tok, server = served
    assert connect_api_base(server.url, tok, top_k=4, ambiguous="drop").ambiguous == "drop"
    assert connect_api_base(server.url, tok, top_k=4).ambiguous == "error"
    with pytest.raises(ValueError, match="api_ambiguous must be 'error' or 'drop'"):
        TrainConfig(api_base=server.url, api_ambiguous="guess").validate()


def test_cli_tokenizer_mismatch_is_one_line(tmp_path, capsys):
    from tiny_models import make_tiny_model, make_tiny_tokenizer, save_tiny_pair
    _, adapter_dir = save_tiny_pair(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    other = make_tiny_tokenizer(300)  # another vocabulary: other ids for the probe text
    model = make_tiny_model("llama", len(other), 0, eos_token_id=other.eos_token_id)
    with CompletionServer(model, other, max_logprobs=8) as server:
        code, err = _cli(["train", "--reward", reward_file(tmp_path), "--prompts", str(prompts),
                          "--adapter", str(adapter_dir), "--out", str(tmp_path / "run"), "--steps", "1",
                          "--no-progress", "--api-base", server.url], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "tokenizer mismatch" in err, err


def test_cli_run_records_the_served_base_and_resumes(tmp_path, served, capsys):
    from tiny_models import save_tiny_pair
    _, _, tok, server = served
    _, adapter_dir = save_tiny_pair(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "run"
    argv = ["train", "--reward", reward_file(tmp_path), "--prompts", str(prompts),
            "--adapter", str(adapter_dir), "--out", str(out), "--algo", "ppo", "--batch-size", "4",
            "--minibatch-size", "2", "--max-new-tokens", "4", "--eval-size", "2", "--eval-max-new-tokens", "4",
            "--eval-every", "0", "--checkpoint-every", "1", "--no-progress", "--backend", "reference",
            "--api-base", server.url, "--api-top-k", "8", "--api-ambiguous", "drop", "--preset", "none"]
    code, err = _cli(argv + ["--steps", "1"], capsys)
    assert code == 0, err
    meta = json.loads((out / "adapter" / "ipa_adapter.json").read_text())
    assert meta["base"] == server.url
    assert meta["api_base"] == {"url": server.url, "top_k": 8, "dialect": "ipa-fast", "ambiguous": "drop"}
    assert json.loads((out / "config.json").read_text())["api_base"] == server.url
    code, err = _cli(argv + ["--steps", "2", "--resume"], capsys)
    assert code == 0, err
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["type"] == "train"]
    assert steps == [1, 2]
    code, err = _cli([a if a != "8" else "4" for a in argv] + ["--steps", "3", "--resume"], capsys)
    assert code == 2 and "api_top_k 8 -> 4" in err


def test_score_top_k_llama_server_hang_is_a_timeout(served):
    """Each position's request has its own deadline: a hung llama-server is an APIBaseError
    after about ``timeout`` seconds, never a hang."""
    from fixtures.engines.replay import hang

    _, _, tok, _ = served
    routes = fake_llama_server(served[0], tok)
    routes[("POST", "/v1/completions")] = [hang()]
    with FakeEngine(routes) as fake:
        api = APIBase(fake.url, tok, top_logprobs=4, timeout=1.0, retries=0)
        t0 = time.monotonic()
        with pytest.raises(APIBaseError, match="timed out") as e:
            api.score_top_k([tok("the cat sat")["input_ids"]], 1)
        api.close()
    assert e.value.cause == "timeout" and time.monotonic() - t0 < 6
