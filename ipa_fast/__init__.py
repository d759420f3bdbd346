"""ipa_fast: Inference-Time Policy Adapters, fast.

A frozen base LM and a small RL-trained adapter LM combined as a product of experts,
``softmax((base + alpha * adapter) / T)``, filtered (top-k / top-p / min-p) and sampled.

- :func:`sample` — the fused sampler (backends: reference, cpu, triton, cuda).
- :func:`sample_experts` — the same over K weighted experts, ``softmax((sum_k w_k l_k) / T)``.
- :func:`tailored_log_softmax`, :func:`tailored_token_stats` — companion ops (autograd), and
  their K-expert forms :func:`experts_log_softmax`, :func:`experts_token_stats`.
- :class:`TailoredLM` — tailored decoding with any Hugging Face causal LM pair, or an API base.
- ``ipa_fast.training`` — Quark / PPO training of the adapter.

The product semantics these cite (sampler, RNG stream, decoding, training op, evaluation
protocol) are written down in docs/DESIGN.md.
"""
from ipa_fast._version import __version__
from ipa_fast.decoding.api_base import APIBase
from ipa_fast.decoding.tailored import GenerationOutput, ScoreOutput, TailoredLM, save_adapter
from ipa_fast.ops.dispatch import backends
from ipa_fast.ops.log_softmax import experts_log_softmax, tailored_log_softmax
from ipa_fast.ops.rng import RNG_STREAM_VERSION
from ipa_fast.ops.sampling import SampleOutput, sample, sample_experts
from ipa_fast.ops.token_stats import experts_token_stats, tailored_token_stats

__all__ = ["sample", "sample_experts", "SampleOutput", "experts_log_softmax", "experts_token_stats", "backends", "tailored_log_softmax", "tailored_token_stats",
           "TailoredLM", "GenerationOutput", "ScoreOutput", "save_adapter", "APIBase", "RNG_STREAM_VERSION",
           "__version__"]
