"""Tailored decoding: the base and its experts stepped together, one fused sample per step.

- ``tailored``: :class:`TailoredLM` (K experts, presets, ``from_pretrained``, ``generate``,
  ``score``) and the adapter files' metadata (``ipa_adapter.json``).
- ``hf``: ``TailoredLogitsProcessor`` for Hugging Face ``generate``.
- ``api_base``: :class:`APIBase`, a base served by vLLM / llama.cpp / ``ipa_fast.decoding.serve``.
- ``serve``: the bundled HTTP server of a base's top-k log-probs.
- ``tokenizer``: the GPT-2 byte-level BPE tokenizer used by the tiny test models.
- ``bench``: ``ipa-fast bench decode`` (tailored decoding vs HF ``generate``).
"""
