"""Residual adapters: an adapter whose logits are ``adapter(x) - initial(x)``.

An adapter trained with ``ipa-fast train --residual`` learns a residual on its own initial weights:
the tailored policy is ``base + alpha * (adapter - initial)``, so the untrained product is the base
exactly, while every parameter receives its full gradient from the first step (docs/DESIGN.md §4.2).
Its ``ipa_adapter.json`` names the initial adapter under ``residual_of`` (its directory, or
``"embedded": true`` for the embedded adapter initialisation, and the sha256 of its weight files);
loading it (``TailoredLM.from_pretrained``, ``TailoredLogitsProcessor.from_pretrained``,
``ipa-fast generate --adapter``) wraps the two models in one :class:`ResidualAdapter`, which every
decoding path steps like any Hugging Face causal LM, so ``alpha`` scales the residual as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ResidualOutput:
    """What :meth:`ResidualAdapter.forward` returns: the residual logits and the pair of caches."""
    logits: torch.Tensor
    cache: tuple | None = None


class ResidualAdapter(torch.nn.Module):
    """``trained(x) - initial(x)`` as one causal LM (logits over the trained model's outputs).

    ``forward`` takes the keyword arguments the decoding paths pass to a Hugging Face causal LM
    (``input_ids``, ``attention_mask``, ``position_ids``, ``use_cache``, ``logits_to_keep``,
    ``cache``); ``cache`` is the pair of the two models' caches. The initial model is frozen.
    """

    def __init__(self, trained: torch.nn.Module, initial: torch.nn.Module):
        super().__init__()
        n_t, n_i = _out_size(trained), _out_size(initial)
        if n_i < n_t:
            raise ValueError(f"residual adapter: the initial adapter has {n_i} output logits, the trained one "
                             f"{n_t}; the initial adapter must cover the trained one's vocabulary")
        self.trained, self.initial = trained, initial.eval().requires_grad_(False)
        self.config = trained.config

    @property
    def _can_compile_fullgraph(self) -> bool:  # the compiled decode step runs both networks
        return bool(getattr(self.trained, "_can_compile_fullgraph", False)
                    and getattr(self.initial, "_can_compile_fullgraph", False))

    def get_input_embeddings(self):
        return self.trained.get_input_embeddings()

    def get_output_embeddings(self):
        return self.trained.get_output_embeddings()

    def forward(self, *, cache=None, use_cache: bool = False, **kwargs) -> ResidualOutput:
        if kwargs.get("output_hidden_states"):
            raise ValueError("a residual adapter has no single hidden state; train it with --residual instead")
        c_t, c_i = cache if cache is not None else (None, None)
        a = self.trained(cache=c_t, use_cache=use_cache, **kwargs)
        b = self.initial(cache=c_i, use_cache=use_cache, **kwargs)
        n = a.logits.shape[-1]
        logits = a.logits - b.logits[..., :n].to(a.logits.dtype)
        return ResidualOutput(logits=logits, cache=(a.cache, b.cache) if use_cache else None)


def _out_size(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def weight_files(directory) -> list[Path]:
    """An adapter directory's weight files (what ``residual_of`` / ``frozen_experts`` hash)."""
    return sorted(f for pattern in ("*.safetensors", "pytorch_model*.bin") for f in Path(directory).glob(pattern))


def weight_hashes(directory) -> dict[str, str]:
    """The sha256 of each of an adapter directory's weight files, by file name."""
    from ipa_fast import embedded

    return {f.name: embedded.sha256_file(f) for f in weight_files(directory)}


def residual_record(directory) -> dict:
    """``residual_of`` for ``ipa_adapter.json``: the initial adapter's directory (or ``"adapter-init"``
    with ``"embedded": true`` when it is the embedded adapter initialisation, found again wherever
    the cache is) and the sha256 of its weight files."""
    from ipa_fast import embedded

    path = Path(str(directory)).expanduser().resolve()
    try:
        is_embedded = path == embedded.adapter_init_path().resolve()
    except Exception:  # no embedded cache here: a plain directory
        is_embedded = False
    # the embedded initialisation is named, not located: its cache differs from machine to machine
    return {"name": "adapter-init" if is_embedded else str(path), "embedded": is_embedded,
            "sha256": weight_hashes(path)}


def initial_directory(meta: dict, adapter_dir) -> Path:
    """The directory of a residual adapter's initial weights, checked against the recorded sha256
    (ValueError, one line, when it is missing or differs)."""
    from ipa_fast import embedded

    rec = meta.get("residual_of") or {}
    if rec.get("embedded"):
        path = embedded.adapter_init_path()
    else:
        path = Path(str(rec.get("name", "")))
    if not path.is_dir():
        raise ValueError(f"adapter {adapter_dir} is a residual of {path}, which is not here"
                         + (f" (run `{embedded.SETUP_CMD}`)" if rec.get("embedded") else ""))
    want = rec.get("sha256") or {}
    if not want or weight_hashes(path) != want:
        raise ValueError(f"adapter {adapter_dir} is a residual of {path}, but the weights there are not the ones "
                         f"it was trained from (sha256 differs)")
    return path


def wrap_if_residual(model, meta: dict | None, adapter_dir, load):
    """``model`` itself, or a :class:`ResidualAdapter` of it and its initial weights when ``meta``
    (its ``ipa_adapter.json``) names them; ``load(path)`` loads a model as the caller loads adapters
    (same dtype and device)."""
    if not meta or not meta.get("residual_of"):
        return model
    return ResidualAdapter(model, load(str(initial_directory(meta, adapter_dir))))
