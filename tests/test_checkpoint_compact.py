"""Compact checkpoints: what can be rebuilt exactly is not written.

An adapter that shares the base's embedding table (the embedded default's adapters do, frozen)
used to write that table four times per checkpoint (its own tied input/output copy, the KL
reference's, Adam's two all-zero moments). These tests check the packing against the plain
state dicts it replaces (round trips bit for bit), that a training run resumed from a compact
checkpoint is the run that never stopped, that the file really is smaller, and that a
checkpoint refuses to take its shared rows from a different base.
"""

import pytest
import torch

from ipa_fast.training import TrainConfig, train
from ipa_fast.training import checkpoint as ckpt
from tests.tiny_models import make_tiny_pair

PROMPTS = ["the cat", "a dog", "we play", "birds sing", "she writes", "he cooks", "people walk", "hello"]

pytestmark = pytest.mark.usefixtures("one_thread")


def even_tokens(prompts, completions, completion_ids):
    return [sum(i % 2 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]


def sharing_pair(n_control_tokens=0):
    """A tiny pair whose adapter's embedding (tied to its head) starts as the base's table, and
    may have Quark control rows after it."""
    base, adapter, tok = make_tiny_pair(seed=0, n_control_tokens=n_control_tokens)
    with torch.no_grad():
        base.get_output_embeddings().weight.div_(8)
        V = base.get_input_embeddings().weight.shape[0]
        adapter.get_input_embeddings().weight[:V].copy_(base.get_input_embeddings().weight)
    assert adapter.get_output_embeddings().weight is adapter.get_input_embeddings().weight
    return base, adapter, tok


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- packing


def test_module_state_round_trip_drops_tied_and_reference_rows():
    base, adapter, _ = sharing_pair(n_control_tokens=2)
    sd = adapter.state_dict()
    name = "transformer.wte.weight"
    table = base.get_input_embeddings().weight.detach()
    packed = ckpt.pack_module_state(sd, {name: table})
    assert packed["tied"] == {"lm_head.weight": name}
    assert packed["rows_from_reference"] == {name: table.shape[0]}
    assert packed["tensors"][name].shape[0] == 2  # the two control rows only
    assert "lm_head.weight" not in packed["tensors"]
    assert_same_state(ckpt.unpack_module_state(packed, {name: table}), sd)
    # what is written is the packed form: it survives the checkpoint codec
    assert_same_state(ckpt.unpack_module_state(ckpt.from_files(ckpt.to_files(packed)), {name: table}), sd)


def test_rows_that_differ_from_the_reference_are_stored_whole():
    base, adapter, _ = sharing_pair()
    name = "transformer.wte.weight"
    with torch.no_grad():
        adapter.get_input_embeddings().weight[3, 0] += 1.0  # one changed value in the shared rows
    sd = adapter.state_dict()
    packed = ckpt.pack_module_state(sd, {name: base.get_input_embeddings().weight.detach()})
    assert packed["rows_from_reference"] == {}
    assert torch.equal(packed["tensors"][name], sd[name])
    # another dtype is not "equal" either
    packed = ckpt.pack_module_state(sd, {name: base.get_input_embeddings().weight.detach().double()})
    assert packed["rows_from_reference"] == {}


def test_unpack_without_the_reference_fails_in_one_line():
    base, adapter, _ = sharing_pair()
    name = "transformer.wte.weight"
    packed = ckpt.pack_module_state(adapter.state_dict(), {name: base.get_input_embeddings().weight.detach()})
    with pytest.raises(ckpt.CheckpointError, match="shared table"):
        ckpt.unpack_module_state(packed, {})
    with pytest.raises(ckpt.CheckpointError, match="shared table"):
        ckpt.unpack_module_state(packed, {name: torch.zeros(5, 32)})


def test_plain_state_dicts_from_older_checkpoints_load_as_they_are():
    sd = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    assert ckpt.unpack_module_state(sd) is sd
    opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(2, 2)}}, "param_groups": []}
    assert ckpt.unpack_optimizer_state(opt) is opt


def test_optimizer_state_round_trip_drops_leading_zero_rows():
    w = torch.nn.Parameter(torch.randn(6, 4))
    v = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w, v], lr=0.1, weight_decay=0.0)
    w.grad = torch.zeros(6, 4)
    w.grad[4:] = torch.randn(2, 4)  # rows 0-3 never get gradient: their moments stay 0
    v.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    packed = ckpt.pack_optimizer_state(sd)
    assert packed["leading_zero_rows"] == {"0/exp_avg": 4, "0/exp_avg_sq": 4}
    assert packed["state"][0]["exp_avg"].shape == (2, 4)
    back = ckpt.unpack_optimizer_state(ckpt.from_files(ckpt.to_files(packed)))
    assert back["param_groups"] == sd["param_groups"]
    for idx in sd["state"]:
        assert_same_state(back["state"][idx], sd["state"][idx])
    # all-zero moments (a step with no gradient at all) round-trip too
    w.grad = torch.zeros(6, 4)
    opt2 = torch.optim.AdamW([w], lr=0.1)
    opt2.step()
    sd2 = opt2.state_dict()
    assert ckpt.pack_optimizer_state(sd2)["leading_zero_rows"]["0/exp_avg"] == 6
    assert_same_state(ckpt.unpack_optimizer_state(ckpt.pack_optimizer_state(sd2))["state"][0], sd2["state"][0])


# ----------------------------------------------------------------------------- training


def config(out, algo, steps, **kw):
    return TrainConfig(out=str(out), algo=algo, steps=steps, batch_size=8, minibatch_size=4, max_new_tokens=6,
                       eval_every=2, eval_size=4, eval_max_new_tokens=6, progress=False, backend="reference",
                       checkpoint_every=1, lr=1e-2, freeze_shared_embedding=True, **kw)


@pytest.mark.parametrize("algo", ["ppo", "quark"])
def test_resume_from_a_compact_checkpoint_is_exact(tmp_path, algo):
    """4 steps straight == 2 steps, then resumed to 4, with the shared rows left out of the files."""
    kw = dict(reward=even_tokens, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4])
    finals = []
    for name, plan in (("straight", [4]), ("resumed", [2, 4])):
        for i, steps in enumerate(plan):
            base, adapter, tok = sharing_pair()
            out = train(config(tmp_path / name, algo, steps), base=base, adapter=adapter, tokenizer=tok,
                        resume=i > 0, **kw)
        finals.append((out, dict(adapter.named_parameters()), base))
    (s, ps, base), (r, pr, _) = finals
    assert s["final_eval"]["reward"] == r["final_eval"]["reward"]
    assert ps.keys() == pr.keys() and all(torch.equal(ps[k], pr[k]) for k in ps)
    # the shared rows were never moved and never written
    V = base.get_input_embeddings().weight.shape[0]
    assert torch.equal(pr["transformer.wte.weight"][:V], base.get_input_embeddings().weight)
    state, _ = ckpt.load_latest(tmp_path / "resumed" / "checkpoints")
    for net in ("adapter", "ref_adapter"):
        assert state[net]["rows_from_reference"] == {"transformer.wte.weight": V}
        assert state[net]["tensors"]["transformer.wte.weight"].shape[0] == len(state.get("control_ids") or [])
        assert state[net]["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert state["reference_rows_sha256"]


def test_compact_checkpoint_is_smaller_and_refuses_another_base(tmp_path):
    kw = dict(reward=even_tokens, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4])
    base, adapter, tok = sharing_pair()
    train(config(tmp_path / "run", "ppo", 1), base=base, adapter=adapter, tokenizer=tok, **kw)
    path = ckpt.newest_good(tmp_path / "run" / "checkpoints")
    packed_bytes = (path / ckpt.TENSORS_FILE).stat().st_size
    state = ckpt.load(path)
    # the same state with everything written out, as before
    full = dict(state)
    refs = {"transformer.wte.weight": base.get_input_embeddings().weight.detach()}
    for net in ("adapter", "ref_adapter"):
        full[net] = {k: v.clone() for k, v in ckpt.unpack_module_state(state[net], refs).items()}
    full["optimizer"] = ckpt.unpack_optimizer_state(state["optimizer"])
    full_bytes = len(ckpt.to_files(full)[ckpt.TENSORS_FILE])
    emb_bytes = base.get_input_embeddings().weight.numel() * 4
    assert full_bytes - packed_bytes >= 5 * emb_bytes  # 2 networks x (input + tied head) + Adam's 2 moments, - 1 slack
    # a base whose embedding differs: the checkpoint names it instead of rebuilding a wrong adapter
    other, adapter2, tok2 = sharing_pair()
    with torch.no_grad():
        other.get_input_embeddings().weight[0, 0] += 1.0
    with pytest.raises(ckpt.CheckpointError, match="base embedding"):
        train(config(tmp_path / "run", "ppo", 2), base=other, adapter=adapter2, tokenizer=tok2, resume=True, **kw)


def test_an_adapter_with_its_own_embedding_is_stored_whole_and_names_no_base(tmp_path):
    kw = dict(reward=even_tokens, train_prompts=PROMPTS, eval_prompts=PROMPTS[:4])
    base, adapter, tok = make_tiny_pair(seed=0)  # the adapter's table is its own
    train(config(tmp_path / "run", "ppo", 1), base=base, adapter=adapter, tokenizer=tok, **kw)
    state, _ = ckpt.load_latest(tmp_path / "run" / "checkpoints")
    assert state["reference_rows_sha256"] is None
    assert state["adapter"]["rows_from_reference"] == {}
    assert torch.equal(state["adapter"]["tensors"]["transformer.wte.weight"], adapter.get_input_embeddings().weight)
