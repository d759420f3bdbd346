"""ipa_fast: Inference-Time Policy Adapters, fast.

A frozen base LM and a small RL-trained adapter LM combined as a product of experts,
``softmax((base + alpha * adapter) / T)``, filtered (top-k / top-p / min-p) and sampled.
"""
from .dispatch import backends
from .ops import tailored_log_softmax
from .rng import RNG_STREAM_VERSION
from .sampling import SampleOutput, sample

__version__ = "0.1.0"

__all__ = ["sample", "SampleOutput", "backends", "tailored_log_softmax", "RNG_STREAM_VERSION"]
