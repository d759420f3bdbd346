"""``ipa-fast bench decode`` on tiny models: every method yields exactly N tokens per row (EOS
masked), the result's shape, the one-line error without the embedded base."""
import json

import pytest
import torch

from ipa_fast.decoding import bench as bench_decode
from tiny_models import make_tiny_pair


def _eos_loving(base, eos):
    """Make ``base`` put almost all mass on EOS: without masking every method would stop at once."""
    def hook(module, args, out):
        out.logits[..., eos] += 1e4
        return out
    return base.register_forward_hook(hook)


@pytest.mark.parametrize("B", [1, 3])
def test_every_method_gives_exactly_n_tokens(one_thread, B):
    base, adapter, tok = make_tiny_pair(seed=3)
    rows = [tok(t)["input_ids"] for t in ["the cat", "a dog runs in the park", "Hello"][:B]]
    h = _eos_loving(base, tok.eos_token_id)
    try:
        fns = bench_decode.method_fns(base, adapter, tok, rows, 5, top_k=0, top_p=0.9, alpha=1.0)
        assert set(fns) == set(bench_decode.METHODS)
        for name, fn in fns.items():
            assert fn() == B * 5, name
        new = bench_decode.hf_generate(base, rows, 5, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id])
        assert new.shape == (B, 5) and not bool((new == tok.eos_token_id).any())
        ids, lp = bench_decode.naive_generate(base, adapter, rows, 5, pad_id=tok.pad_token_id, top_k=0,
                                              eos_ids=[tok.eos_token_id])
        assert not bool((ids[:, -5:] == tok.eos_token_id).any()) and bool((lp <= 0).all())
    finally:
        h.remove()


def test_run_result_and_plot(monkeypatch, tmp_path, capsys):
    from ipa_fast.cli.main import main

    monkeypatch.setattr(bench_decode, "bench_models", lambda tiny, adapter_dir=None: (*make_tiny_pair(seed=4), "tiny pair"))
    n = torch.get_num_threads()
    rc = main(["bench", "decode", "--tiny", "--prompts", "detox", "--batch", "1", "--batch", "2", "--new-tokens", "3",
               "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png")])
    assert rc == 0 and torch.get_num_threads() == n  # the thread count is restored
    res = json.loads((tmp_path / "d.json").read_text())
    assert [r["batch"] for r in res["results"]] == [1, 2] and res["new_tokens"] == 3 and res["torch_threads"] == 1
    for r in res["results"]:
        assert r["hf-base"]["ratio_vs_hf_base"] == pytest.approx(1.0)
        for k in bench_decode.METHODS:
            assert r[k]["tok_s"] > 0 and 0 <= r[k]["outside_forward"] <= 1
    assert (tmp_path / "d.png").stat().st_size > 0
    assert "(b) TailoredLM" in capsys.readouterr().out


def test_missing_base_is_one_line_naming_setup(monkeypatch, tmp_path, capsys):
    from ipa_fast.cli.main import main

    monkeypatch.setenv("IPA_FAST_HOME", str(tmp_path / "empty"))
    assert main(["bench", "decode", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ipa-fast setup" in err and "--tiny" in err


def test_bad_flags_refused(capsys):
    from ipa_fast.cli.main import main

    for argv in (["--threads", "0"], ["--top-p", "0"], ["--prompts", "nope"], ["--batch", "-1"],
                 ["--tiny", "--adapter", "somewhere"]):
        assert main(["bench", "decode", *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_a_residual_adapter_directory_is_timed_with_its_initial_weights(tmp_path):
    """--adapter DIR loads the adapter as every decoding path does: a residual adapter comes with
    its initial weights (one ResidualAdapter), and the naive loop steps it like any causal LM."""
    from ipa_fast.decoding.residual import ResidualAdapter, residual_record
    from ipa_fast.decoding.tailored import save_adapter

    base, adapter, tok = make_tiny_pair(seed=4, base_arch="llama", adapter_arch="llama")
    save_adapter(tmp_path / "init", adapter, tok, alpha=1.0)
    _, trained, _ = make_tiny_pair(seed=5, base_arch="llama", adapter_arch="llama")
    save_adapter(tmp_path / "res", trained, tok, alpha=0.5, extra={"residual_of": residual_record(tmp_path / "init")})
    from ipa_fast.decoding.tailored import TailoredLM
    loaded = TailoredLM.from_pretrained(base, str(tmp_path / "res"), tokenizer=tok).adapter
    assert isinstance(loaded, ResidualAdapter)
    rows = [tok("the cat")["input_ids"], tok("a dog sat down")["input_ids"]]
    ids, logprobs = bench_decode.naive_generate(base, loaded, rows, 3, pad_id=tok.pad_token_id or 0, seed=0)
    assert tuple(logprobs.shape) == (2, 3)
    # reference: each drawn token's log-prob under base + (trained - initial), recomputed without caches
    # on the unpadded row
    for r, prompt in enumerate(rows):
        new = ids[r, -3:].tolist()
        full = torch.tensor([prompt + new])
        with torch.no_grad():
            z = base(input_ids=full).logits + trained(input_ids=full).logits - adapter(input_ids=full).logits
        lp = torch.log_softmax(z[0].double(), -1)
        want = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(new)]
        assert logprobs[r].tolist() == pytest.approx(want, abs=1e-4)


def test_compile_row_times_the_compiled_step_apart(monkeypatch, tmp_path, capsys):
    """--compile adds (e): the same tokens as (b) in its warm-up, its compile time apart, and the
    compiled-vs-eager ratio (dynamo's "eager" backend here: tracing without code generation)."""
    from ipa_fast.cli.main import main

    torch._dynamo.reset()
    monkeypatch.setattr(bench_decode, "bench_models", lambda tiny, adapter_dir=None: (*make_tiny_pair(seed=4, base_arch="llama",
                                                                                   adapter_arch="llama"), "tiny"))
    rc = main(["bench", "decode", "--tiny", "--prompts", "detox", "--batch", "2", "--new-tokens", "4",
               "--repeats", "1", "--threads", "1", "--compile", "eager", "--json", str(tmp_path / "d.json")])
    assert rc == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["compile"] == "eager" and bench_decode.COMPILED in res["methods"]
    (r,) = res["results"]
    m = r[bench_decode.COMPILED]
    assert m["tokens_match"] is True and m["max_logprob_diff"] < 1e-5
    assert m["tok_s"] > 0 and m["first_call_s"] > 0 and m["outside_forward"] is None and "compile_s" in m
    assert r["compiled_vs_eager"] == pytest.approx(r["tailored"]["seconds"] / m["seconds"])
    for k in ("tailored", bench_decode.COMPILED):
        assert r[k]["step_s"] == pytest.approx((r[k]["seconds"] - r[k]["one_token_s"]) / 3)
    assert r["compiled_vs_eager_step"] == pytest.approx(r["tailored"]["step_s"] / m["step_s"])
    assert not any(k.endswith(bench_decode.ONE) for k in r)
    assert "(e) vs (b)" in capsys.readouterr().out
    torch._dynamo.reset()
