"""``TailoredLM.from_pretrained``: transformers-style ``dtype`` / ``torch_dtype`` and
``device_map``, beside the older ``base_dtype`` / ``adapter_dtype`` / ``*_device`` arguments.
Tiny random models saved to a temporary directory (no downloads)."""
from __future__ import annotations

import pytest
import torch

from ipa_fast import TailoredLM
from tiny_models import save_tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"), seed=3)


def dtypes(lm):
    return next(lm.base.parameters()).dtype, next(lm.adapter.parameters()).dtype


def test_default_is_float32_on_cpu(dirs):
    assert dtypes(TailoredLM.from_pretrained(*dirs)) == (torch.float32, torch.float32)


@pytest.mark.parametrize("kw", [dict(dtype=torch.bfloat16), dict(torch_dtype=torch.bfloat16),
                                dict(dtype="bfloat16"), dict(dtype=torch.bfloat16, torch_dtype="torch.bfloat16")])
def test_dtype_and_torch_dtype_load_both_models(dirs, kw):
    lm = TailoredLM.from_pretrained(*dirs, **kw)
    assert dtypes(lm) == (torch.bfloat16, torch.bfloat16)
    out = lm.generate(["the cat"], max_new_tokens=3, seed=0)
    assert len(out.token_ids[0]) >= 1


def test_per_model_dtype_overrides_dtype(dirs):
    lm = TailoredLM.from_pretrained(*dirs, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert dtypes(lm) == (torch.bfloat16, torch.float32)
    lm = TailoredLM.from_pretrained(*dirs, base_dtype=torch.float16)   # the older argument alone
    assert dtypes(lm) == (torch.float16, torch.float32)


def test_conflicting_or_bad_dtype_raises(dirs):
    with pytest.raises(TypeError, match="torch_dtype"):
        TailoredLM.from_pretrained(*dirs, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        TailoredLM.from_pretrained(*dirs, dtype="float99")


@pytest.fixture
def load_calls(monkeypatch):
    """The keyword arguments of every AutoModelForCausalLM.from_pretrained call, by path."""
    from transformers import AutoModelForCausalLM

    calls, real = {}, AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        calls[str(path)] = kwargs
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto"])
def test_device_map_places_the_base_and_the_adapter_follows(dirs, device_map, load_calls):
    pytest.importorskip("accelerate")
    lm = TailoredLM.from_pretrained(*dirs, device_map=device_map)
    assert load_calls[str(dirs[0])]["device_map"] == device_map      # passed through for the base
    assert "device_map" not in load_calls[str(dirs[1])]              # the adapter is moved instead
    base_dev = next(lm.base.parameters()).device
    assert next(lm.adapter.parameters()).device == base_dev == lm.device
    if base_dev.type == "cpu":
        assert dtypes(lm) == (torch.float32, torch.float32)
    plain = TailoredLM.from_pretrained(*dirs, dtype=dtypes(lm)[0])
    kw = dict(max_new_tokens=4, seed=5, top_p=0.9)
    assert lm.generate(["a dog"], **kw).token_ids == plain.generate(["a dog"], **kw).token_ids


def test_device_map_with_base_device_raises(dirs):
    with pytest.raises(TypeError, match="device_map"):
        TailoredLM.from_pretrained(*dirs, device_map="cpu", base_device="cpu")


def test_old_arguments_still_work(dirs):
    lm = TailoredLM.from_pretrained(*dirs, base_device="cpu", adapter_device="cpu", alpha=0.5)
    assert lm.alpha == 0.5 and lm.device.type == "cpu"


def test_loaded_base_is_shared_and_decodes_as_the_path_does(dirs, tmp_path):
    """A base model already in memory: only the adapter is loaded, its stored alpha applies, and
    decoding equals loading both from their directories."""
    from ipa_fast.decoding.tailored import save_adapter

    base_dir, adapter_dir = dirs
    by_path = TailoredLM.from_pretrained(str(base_dir), str(adapter_dir))
    saved = tmp_path / "adapter"
    save_adapter(saved, by_path.adapter, by_path.tokenizer, alpha=0.7)
    by_path = TailoredLM.from_pretrained(str(base_dir), str(saved))
    shared = TailoredLM.from_pretrained(by_path.base, str(saved))
    assert shared.base is by_path.base and shared.alpha == by_path.alpha == 0.7
    kw = dict(max_new_tokens=6, seed=3, top_p=0.9)
    assert shared.generate(["the cat", "a dog"], **kw).token_ids == by_path.generate(["the cat", "a dog"], **kw).token_ids
    with pytest.raises(TypeError, match="already loaded"):
        TailoredLM.from_pretrained(by_path.base, str(saved), base_dtype=torch.float16)
