"""ipa_fast: Inference-Time Policy Adapters, fast.

A frozen base LM and a small RL-trained adapter LM combined as a product of experts,
``softmax((base + alpha * adapter) / T)``, filtered (top-k / top-p / min-p) and sampled.

- :func:`sample` — the fused sampler (backends: reference, cpu, triton, cuda).
- :func:`tailored_log_softmax`, :func:`tailored_token_stats` — companion ops (autograd).
- :class:`TailoredLM` — tailored decoding with any Hugging Face causal LM pair, or an API base.
- ``ipa_fast.training`` — Quark / PPO training of the adapter.

The product semantics these cite (sampler, RNG stream, decoding, training op, evaluation
protocol) are written down in docs/DESIGN.md.
"""
from ._version import __version__
from .api_base import APIBase
from .decoding import GenerationOutput, ScoreOutput, TailoredLM, save_adapter
from .dispatch import backends
from .ops import tailored_log_softmax
from .rng import RNG_STREAM_VERSION
from .sampling import SampleOutput, sample
from .token_stats import tailored_token_stats

__all__ = ["sample", "SampleOutput", "backends", "tailored_log_softmax", "tailored_token_stats",
           "TailoredLM", "GenerationOutput", "ScoreOutput", "save_adapter", "APIBase", "RNG_STREAM_VERSION",
           "__version__"]
