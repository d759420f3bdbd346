"""The fused ops of the product of experts and everything they stand on.

- ``sampling``: :func:`sample` / :func:`sample_experts` (mix, temperature, top-k / top-p / min-p,
  one draw per row from the counter-based RNG stream), their argument checks and their
  ``torch.library`` registration (``torch.ops.ipa_fast.sample_experts``).
- ``log_softmax``: the tailored / K-expert log-softmax with autograd.
- ``token_stats``: the training op (log-probs of chosen tokens, entropy, KL) and its backward.
- ``reference``: the one definition of the semantics (the mix rule, parameter ranges, dtype codes)
  that every backend is tested against.
- ``dispatch``: backend choice (reference, cpu, triton, cuda); ``cpu_backend`` / ``cuda_backend``:
  the compiled kernels' wrappers; ``rng``: the Philox stream.
- ``bench_sampler``, ``bench_llama_cpp``: the sampler's benchmarks (``ipa-fast bench sampler``).
"""
