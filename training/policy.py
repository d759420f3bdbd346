"""The policy being trained: a frozen base, the trained adapter and any other frozen experts, as
one product of experts, and its teacher-forced forward.

    pi = softmax((base + alpha * adapter + sum_j w_j * frozen_j) / T)

:class:`Policy` holds the models (the base and the frozen experts never get gradients; the
adapter is the only trained model), the :class:`~ipa_fast.decoding.tailored.TailoredLM` that rolls it out
(every expert with its own prefix), and :meth:`Policy.token_stats`, which scores given responses
under ``pi`` with :func:`ipa_fast.ops.token_stats.experts_token_stats`: log pi, H(pi) and
KL(pi || pi_ref) per token, differentiable w.r.t. the adapter. The KL reference is the same
product with the adapter replaced by its frozen initial copy (``reference="initial"``) or left
out (``"base"``): the frozen experts are in both, so the KL measures what the adapter changed.

The base may be a served model (an :class:`~ipa_fast.decoding.api_base.APIBase`): rollouts
then go through the same TailoredLM (the base's top-K per step, docs/DESIGN.md §2.10), and the
teacher-forced base is the sparse base of the scored sequence (:meth:`APIBase.score_top_k
<ipa_fast.decoding.api_base.APIBase.score_top_k>`: the base's log-probs on its top-K plus the
token that is there, ``-inf`` elsewhere), asked once per sequence and cached
(:meth:`Policy.sparse_base`), combined with the adapter's full logits by the same op.
"""
from __future__ import annotations

import collections
import copy
from dataclasses import dataclass, field

import torch

from ipa_fast.decoding.api_base import APIBase
from ipa_fast.decoding.tailored import TailoredLM, _as_id_list, densify_top_k, left_pad
from ipa_fast.ops.token_stats import experts_token_stats


def freeze_embedding_rows(model, n_rows: int) -> None:
    """Zero the gradient of the first ``n_rows`` rows of ``model``'s input embedding (and so of a
    tied output head): with no weight decay on them, AdamW then never moves them."""
    weight = model.get_input_embeddings().weight

    def mask(grad):
        grad = grad.clone()
        grad[:n_rows] = 0
        return grad

    weight.register_hook(mask)
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weight:
        out.weight.requires_grad_(False)


def zero_output(model) -> None:
    """Set the gain (and bias) of ``model``'s final normalisation to 0, so its logits are all 0 (a
    uniform distribution: adding them to the base's changes nothing) while every parameter still
    receives gradient after the first step."""
    norm = None
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        norm = getattr(model.base_model, name, None)
        if norm is not None:
            break
    if norm is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"zero_init_output: {type(model).__name__} has no final norm with a gain to zero")
    with torch.no_grad():
        norm.weight.zero_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
        device = next(model.parameters()).device
        # a few ordinary tokens (token 0 may be a padding row whose embedding is zero)
        probe = torch.arange(1, 4, device=device).clamp_(max=model.get_input_embeddings().num_embeddings - 1)
        logits = model(input_ids=probe.view(1, -1), use_cache=False).logits
    if logits.abs().max().item() != 0:  # e.g. a norm computing (1 + gain) * x
        raise ValueError(f"zero_init_output: zeroing {type(model).__name__}'s final norm does not zero its logits")


@dataclass
class FrozenExpert:
    """One frozen expert of the product: its model, weight and prefix (the ids it sees before
    every prompt), and what identifies it (``name``: the directory it came from; ``sha256``: its
    weights files' digests, by file name)."""
    model: torch.nn.Module
    weight: float
    prefix: list[int] = field(default_factory=list)
    name: str = ""
    sha256: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        """What the trained adapter's ipa_adapter.json and the checkpoint record about it."""
        return {"name": self.name, "weight": self.weight, "adapter_prefix": list(self.prefix),
                "sha256": dict(self.sha256)}


def response_positions(lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the positions predicting each response token in a window of the last
    ``max(lens) + 1`` positions (row i's response is its last ``lens[i]`` tokens)."""
    R = max(lens)
    rows = torch.tensor([i for i, n in enumerate(lens) for _ in range(n)], dtype=torch.long)
    cols = torch.tensor([R - n + k for n in lens for k in range(n)], dtype=torch.long)
    return rows, cols


class Policy:
    """The tailored policy of a run (see the module docstring).

    ``base`` is frozen here (eval mode, no gradients); ``adapter`` is put in eval mode for good
    (dropout off in rollouts and updates) and, with ``zero_init_output``, starts with zero logits;
    ``freeze_shared_embedding`` keeps its first V embedding rows fixed. ``frozen``: the other
    experts (:class:`FrozenExpert`), frozen like the base. ``adapter_prefix``: the ids the adapter
    sees before every prompt at rollout and inference time (Quark: its best control token).
    ``reference``: ``"initial"`` (a frozen copy of the adapter as it is now) or ``"base"``.
    ``min_new_tokens``: the rollouts' early-EOS mask, applied to the scored policy too.
    ``base`` may be an :class:`~ipa_fast.decoding.api_base.APIBase` (a served base, see the
    module docstring); ``base_cache_size``: scored sequences whose sparse base is kept.
    """

    def __init__(self, base, adapter, tokenizer, *, alpha: float, temperature: float = 1.0,
                 min_new_tokens: int = 0, frozen: list[FrozenExpert] | tuple = (), reference: str = "initial",
                 adapter_prefix: list[int] | None = None, zero_init_output: bool = False,
                 freeze_shared_embedding: bool = False, base_cache_size: int = 4096):
        self.api_base = isinstance(base, APIBase)
        self.base = base if self.api_base else base.eval()
        if not self.api_base:
            for p in self.base.parameters():
                p.requires_grad_(False)
        self._base_cache: collections.OrderedDict = collections.OrderedDict()
        self.base_cache_size = int(base_cache_size)
        self.base_rows_scored = 0  # sequences sent to an API base for scoring (tests, benchmarks)
        self.adapter = adapter.eval()
        self.frozen = list(frozen)
        for e in self.frozen:
            e.model.eval()
            for p in e.model.parameters():
                p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.alpha, self.temperature, self.min_new_tokens = alpha, temperature, min_new_tokens
        self.adapter_prefix = list(adapter_prefix or [])
        self.lm = TailoredLM(self.base, tokenizer=tokenizer, experts=[self.adapter, *(e.model for e in self.frozen)],
                             weights=[alpha, *(e.weight for e in self.frozen)],
                             prefixes=[None, *(e.prefix for e in self.frozen)])
        self.V = self.lm.V
        self.pad_id = self.lm.pad_id
        if zero_init_output:
            zero_output(self.adapter)
        self.ref_adapter = None
        if reference == "initial":
            self.ref_adapter = copy.deepcopy(self.adapter).eval()
            for p in self.ref_adapter.parameters():
                p.requires_grad_(False)
        if freeze_shared_embedding:
            freeze_embedding_rows(self.adapter, self.V)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad]

    def reset_reference(self) -> None:
        """Make the adapter as it is now the KL reference (after a warm start); no-op with
        ``reference="base"``."""
        if self.ref_adapter is not None:
            self.ref_adapter.load_state_dict(self.adapter.state_dict())

    def encode(self, prompts) -> list[list[int]]:
        return self.lm.encode(prompts)

    # ------------------------------------------------------------------------------------
    # teacher-forced forward

    def logits(self, model, rows, keep, hidden=False, head=True):
        """Logits and (with ``hidden``) final hidden states of the last ``keep`` positions of the
        left-padded ``rows``; ``head=False`` skips the output head on them (logits come back None)."""
        ids, mask = left_pad(rows, self.pad_id, next(model.parameters()).device)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                    logits_to_keep=keep if head else 1, output_hidden_states=hidden)
        return (out.logits[:, -keep:] if head else None), (out.hidden_states[-1][:, -keep:] if hidden else None)

    def token_stats(self, prompt_ids, prefixes, responses, value_head=None, kl: bool = True,
                    eos_mask: bool = True) -> dict:
        """Per-token statistics of ``responses`` under pi, right-padded to ``[B, R]``.

        ``prefixes``: per row, what the adapter sees before the prompt (Quark: the sample's
        quantile token); the frozen experts see their own. Returns ``logprob``, ``entropy``,
        ``kl`` (to the reference; with ``kl=False`` the reference adapter is not run and ``kl``
        is measured against the base and frozen experts alone), ``mask`` and, with a
        ``value_head``, its ``values`` of the adapter's last hidden state. ``eos_mask=False``
        scores without the rollouts' early-EOS mask (supervised targets may end before
        ``min_new_tokens``: masked, their EOS would cost 1e4 nats). Differentiable w.r.t. the
        adapter (and value head) when grad is enabled.
        """
        B = len(responses)
        lens = [len(r) for r in responses]
        R = max(lens)
        full = [list(p) + list(r) for p, r in zip(prompt_ids, responses)]
        adapter_rows = [list(x) + f for x, f in zip(prefixes, full)]
        rows, cols = response_positions(lens)  # gather the predicting logits into [N, V] rows
        targets = torch.tensor([t for r in responses for t in r], dtype=torch.long)
        with torch.no_grad():
            if self.api_base:
                zb = self.sparse_base(full, [len(p) for p in prompt_ids]).to(next(self.adapter.parameters()).device)
            else:
                zb, _ = self.logits(self.base, full, R + 1)
                zb = zb[rows, cols, :self.V]
            zr = None
            if self.ref_adapter is not None and kl:
                zr, _ = self.logits(self.ref_adapter, adapter_rows, R + 1)
                zr = zr[rows, cols, :self.V]
            zf = [self.logits(e.model, [list(e.prefix) + f for f in full], R + 1)[0][rows, cols, :self.V]
                  for e in self.frozen]
        if self.min_new_tokens and eos_mask:
            # the rollouts' EOS mask, applied to the scored policy too (as the official code
            # does): otherwise pi could hide probability on EOS where rollouts never draw it
            k = torch.cat([torch.arange(n) for n in lens])
            eos = _as_id_list(self.tokenizer.eos_token_id)
            early = (k < self.min_new_tokens).nonzero().view(-1).to(zb.device)
            zb = zb.clone()
            at = (early.view(-1, 1), torch.tensor(eos, device=zb.device).view(1, -1))
            # a sparse base's -inf stays -inf (masking must not add a token to its support)
            zb[at] = zb[at].clamp(max=-1e4) if self.api_base else -1e4
        za, hidden = self.logits(self.adapter, adapter_rows, R + 1, hidden=value_head is not None)
        za = za[rows, cols, :self.V].to(zb.device)
        zf = [z.to(zb.device) for z in zf]
        fw = [e.weight for e in self.frozen]
        # pi: base + alpha * adapter + sum_j w_j * frozen_j; pi_ref: the same with the reference
        # adapter in the adapter's place, or without an adapter
        ref_experts, ref_weights = [zb, *zf], [1.0, *fw]
        if zr is not None:
            ref_experts, ref_weights = [zb, zr.to(zb.device), *zf], [1.0, self.alpha, *fw]
        lp, ent, kl = experts_token_stats([zb, za, *zf], [1.0, self.alpha, *fw], targets.to(zb.device),
                                          temperature=self.temperature, ref_experts=ref_experts,
                                          ref_weights=ref_weights)
        mask = torch.zeros(B, R)
        mask[torch.arange(B).repeat_interleave(torch.tensor(lens)), torch.cat([torch.arange(n) for n in lens])] = 1

        def pad(flat):
            outp = torch.zeros(B, R, dtype=flat.dtype, device=flat.device)
            return outp.index_put((torch.arange(B).repeat_interleave(torch.tensor(lens)),
                                   torch.cat([torch.arange(n) for n in lens])), flat)

        out = {"logprob": pad(lp.cpu()), "entropy": pad(ent.cpu()), "kl": pad(kl.cpu()), "mask": mask}
        if value_head is not None:
            out["values"] = pad(value_head(hidden[rows, cols]).cpu())
        return out

    def sparse_base(self, rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        """The API base's teacher-forced sparse base: ``[N, V]`` float32 log-probs for every
        position ``t >= starts[i]`` of every row (row-major), ``-inf`` outside the base's top-K and
        the token ``rows[i][t]`` itself. That token's own log-prob is the server's; where the
        server does not report it (llama-cpp-python outside the top-K) it gets the smallest
        top-K log-prob, an upper bound (docs/DESIGN.md §2.10). Each (row, start) is asked of the
        server once and cached (LRU, ``base_cache_size`` sequences): PPO's epochs and
        minibatches, and Quark's pool, reuse it."""
        keys = [(tuple(int(t) for t in r), int(s)) for r, s in zip(rows, starts)]
        found = {k: self._base_cache[k] for k in dict.fromkeys(keys) if k in self._base_cache}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            got = self.base.score_top_k([list(k[0]) for k in missing], [k[1] for k in missing])
            self.base_rows_scored += len(missing)
            for k, (ids, vals, chosen) in zip(missing, got):
                found[k] = self._base_cache[k] = _sparse_rows(k[0][k[1]:], ids, vals, chosen, self.V)
        for k in found:
            self._base_cache[k] = found[k]
            self._base_cache.move_to_end(k)
        while len(self._base_cache) > self.base_cache_size:
            self._base_cache.popitem(last=False)
        return torch.cat([found[k] for k in keys]) if keys else torch.zeros((0, self.V))

    def adapter_nll(self, prompt_ids, prefixes, targets) -> torch.Tensor:
        """Summed NLL of ``targets`` under the adapter alone (its own log-softmax over the shared
        vocabulary, its prefix before the prompt), differentiable w.r.t. the adapter. The output
        head runs on the target positions only (the last hidden state is the final-norm output in
        Hugging Face causal LMs), not on every kept position of the padded batch."""
        lens = [len(t) for t in targets]
        rows = [list(x) + list(p) + list(t) for x, p, t in zip(prefixes, prompt_ids, targets)]
        _, h = self.logits(self.adapter, rows, max(lens) + 1, hidden=True, head=False)
        r, col = response_positions(lens)
        z = self.adapter.get_output_embeddings()(h[r, col])[:, :self.V].float()
        tgt = torch.tensor([t for ts in targets for t in ts], dtype=torch.long, device=z.device)
        return torch.nn.functional.cross_entropy(z, tgt, reduction="sum")

    # ------------------------------------------------------------------------------------
    # rollouts

    def generate(self, prompts, max_new_tokens, *, seed, temperature, top_k, top_p, min_new_tokens, backend):
        """Samples of pi through :class:`~ipa_fast.decoding.tailored.TailoredLM` (every expert with its
        prefix; the adapter with :attr:`adapter_prefix`)."""
        self.adapter.eval()
        return self.lm.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, min_new_tokens=min_new_tokens, adapter_prefix=self.adapter_prefix,
                                backend=backend)


def _sparse_rows(targets, ids, vals, chosen, V: int) -> torch.Tensor:
    """``[n, V]``: the top-K ``(ids, vals)`` densified with ``-inf`` elsewhere, plus each
    position's target token at its own log-prob ``chosen`` (NaN: unknown, then the smallest
    top-K log-prob, an upper bound on it)."""
    tgt = torch.tensor(list(targets), dtype=torch.long)
    dense = densify_top_k(ids, vals, V)
    if len(tgt):
        n = torch.arange(len(tgt))
        own = torch.where(torch.isnan(chosen), vals.min(dim=1).values, chosen)
        have = dense[n, tgt]
        dense[n, tgt] = torch.where(torch.isneginf(have), own, have)
    return dense
