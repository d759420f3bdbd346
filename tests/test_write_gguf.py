"""scripts/write_gguf.py on a tiny Llama: the GGUF it writes, read back by transformers' own GGUF
loader (the independent reference for llama.cpp's names and rotary layout), is the source model
bit for bit; a second run does nothing; changed weights are rewritten; the check against the
original's tensors catches a wrong layout."""
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from scripts.write_gguf import main, permute_rope, write  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
           max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def _template(path, model, tensors=None):
    """A GGUF with the model's metadata, a byte-level tokenizer and (by default) zero tensors."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        name = names.get_name(k, try_suffixes=(".weight",))
        w.add_tensor(name, (tensors or {}).get(name, np.zeros(tuple(v.shape), np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    src = tmp_path / "base"
    model.save_pretrained(src)
    template = tmp_path / "template.gguf"
    _template(template, model)
    return model, src, template


def test_written_gguf_loads_back_as_the_source_model(tiny, tmp_path):
    model, src, template = tiny
    out = write(src, template, tmp_path / "out.gguf", check=False, verbose=False)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    want, got = model.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ids = torch.tensor([[3, 17, 5, 60, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert {t.tensor_type for t in r.tensors} == {gguf.GGMLQuantizationType.F32}
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["t0", "t1", "t2"]  # the template's metadata
    rec = json.loads((tmp_path / "out.gguf.json").read_text())
    from ipa_fast.embedded import sha256_file
    assert rec["source_sha256"] == sha256_file(src / "model.safetensors")
    assert rec["gguf_sha256"] == sha256_file(out)


def test_second_run_is_a_no_op_and_new_weights_are_rewritten(tiny, tmp_path):
    model, src, template = tiny
    out = write(src, template, tmp_path / "out.gguf", check=False, verbose=False)
    stamp = out.stat().st_mtime_ns
    write(src, template, out, check=False, verbose=False)
    assert out.stat().st_mtime_ns == stamp
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(src)
    write(src, template, out, check=False, verbose=False)
    assert out.stat().st_mtime_ns != stamp
    got = gguf.GGUFReader(str(out))
    norm = next(t for t in got.tensors if t.name == "output_norm.weight")
    assert np.array_equal(np.asarray(norm.data), model.model.norm.weight.detach().numpy())


def test_check_against_the_original_catches_a_wrong_layout(tiny, tmp_path):
    model, src, template = tiny
    out = write(src, template, tmp_path / "out.gguf", check=False, verbose=False)
    # the right tensors as the original: the check passes
    write(src, out, tmp_path / "again.gguf", check=True, verbose=False)
    # an original holding the q rows un-permuted: the check names the tensor
    r = gguf.GGUFReader(str(out))
    tensors = {t.name: np.asarray(t.data).copy() for t in r.tensors}
    tensors["blk.0.attn_q.weight"] = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    bad = tmp_path / "bad.gguf"
    _template(bad, model, tensors)
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: differs from the dequantised original"):
        write(src, bad, tmp_path / "x.gguf", check=True, verbose=False)


def test_permutation_is_the_inverse_of_the_gguf_loaders():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64 // 8, 24)  # 8 heads of 8 rows
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert np.array_equal(undo(permute_rope(w, 8), 8, 8), w)
    assert not np.array_equal(permute_rope(w, 8), w)


def test_missing_source_is_one_line(tmp_path, capsys):
    assert main(["--base", str(tmp_path / "nope"), "--template", str(tmp_path / "t.gguf"),
                 "--out", str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope/model.safetensors not found" in err
