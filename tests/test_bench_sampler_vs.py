"""``ipa-fast bench sampler`` comparisons: --vs-llama-cpp (one-line errors without llama_cpp, a
tiny run where it imports) and --experts (the K sweep's rows), and the grid / filter options."""
import sys
import types

import pytest

from ipa_fast.ops import bench_sampler
from ipa_fast.cli.main import main


def one_line_error(argv, capsys, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip("\n").split("\n")) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_vs_llama_cpp_without_llama_cpp_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    one_line_error(["bench", "sampler", "--vs-llama-cpp"], capsys, "--vs-llama-cpp needs llama-cpp-python",
                   "make bench-llama-cpp")


def test_vs_llama_cpp_with_a_llama_cpp_lacking_the_sampler_api(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.0.1"))
    one_line_error(["bench", "sampler", "--vs-llama-cpp"], capsys, "llama_cpp 0.0.1 lacks",
                   "llama_sampler_chain_init")


@pytest.mark.parametrize("argv, needle", [
    (["--vs-llama-cpp", "--experts", "2", "3"], "separate runs"),
    (["--vs-llama-cpp", "--threads", "2"], "one thread"),
    (["--vs-llama-cpp", "--dtype", "bfloat16"], "float32"),
    (["--experts", "2", "--plot", "x.png"], "--plot"),
    (["--filter", "top_q=0.9"], "unknown filter 'top_q'"),
    (["--filter", "top_p=1.5"], "out of range"),
    (["--filter", "top_k"], "key=value"),
    (["--experts", "0"], "--experts"),
    (["--vocab", "-3"], "--vocab"),
])
def test_bad_options_are_one_line(argv, needle, capsys):
    one_line_error(["bench", "sampler", *argv], capsys, needle)


def test_experts_sweep_rows(one_thread, capsys):
    args = bench_sampler_args(["--experts", "1", "3", "--vocab", "300", "--batch", "2", "--filter", "top_k=5",
                               "--filter", "top_p=0.8,min_p=0.01", "--repeats", "1"])
    result = bench_sampler.run(args)
    assert result["mode"] == "experts" and result["experts"] == [1, 3]
    assert [(r["vocab"], r["batch"], r["filter"]) for r in result["rows"]] == [
        (300, 2, "top_k=5"), (300, 2, "top_p=0.8,min_p=0.01")]
    for r in result["rows"]:
        assert set(r["ms"]) == {1, 3} and r["over_first"][1] == 1.0 and r["ms"][3] > 0
    assert "K3/K1" in capsys.readouterr().out


def test_vs_llama_cpp_tiny_run(one_thread):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python lives in the engines venv (make bench-llama-cpp)")
    args = bench_sampler_args(["--vs-llama-cpp", "--vocab", "500", "--batch", "3", "--filter", "top_k=20,top_p=0.9",
                               "--filter", "top_p=0.9", "--repeats", "1"])
    bench_sampler.validate(args)
    result = bench_sampler.run(args)
    assert result["mode"] == "vs-llama-cpp" and len(result["rows"]) == 2
    for r in result["rows"]:
        assert r["llama_cpp_ms"] > 0 and r["ours_ms"] > 0 and r["llama_over_ours"] > 0


def bench_sampler_args(argv):
    import argparse

    parser = argparse.ArgumentParser()
    bench_sampler.add_arguments(parser)
    return parser.parse_args(argv)
