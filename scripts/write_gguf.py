#!/usr/bin/env python
"""The embedded base's local fp32 weights as an f32 GGUF, for serving with llama.cpp.

    python -m scripts.write_gguf            # -> <cache>/models/base-f32.gguf (idempotent)

The tensors are exactly ``<cache>/models/base/model.safetensors`` (the weights the local path
loads), renamed to llama.cpp's names, with q_proj / k_proj rows permuted back into llama.cpp's
rotary layout (the inverse of what the GGUF loader of transformers undid), stored as f32. The
metadata (tokenizer, chat template, hyper-parameters) is copied from the base's original Q4_1
GGUF, so the server tokenises exactly as before; the hyper-parameters are checked against the
local ``config.json`` and ``general.file_type`` becomes ALL_F32. Every tensor is also checked
against the dequantised original (the local weights are that dequantisation), which pins the
rotary permutation. ``<out>.json`` records the sha256 of the source weights and of the GGUF; a
later run with the same source weights does nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

#: Keys of the original GGUF not copied (the writer sets them itself, or they are replaced).
_SKIP = ("GGUF.", "general.file_type", "general.quantization_version")


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's interleaved rotary layout (llama.cpp's converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def default_paths():
    from ipa_fast import embedded

    base = embedded.base_path()
    template = embedded.home() / "downloads" / Path(embedded.BASE["gguf_member"]).name
    return base, template, embedded.home() / "models" / "base-f32.gguf"


def _field_value(field):
    import gguf

    types = [gguf.GGUFValueType(t) for t in field.types]
    return field.contents(), types[0], (types[1] if types[0] == gguf.GGUFValueType.ARRAY else None)


def _check_config(reader, cfg: dict) -> None:
    want = {"llama.block_count": cfg["num_hidden_layers"], "llama.embedding_length": cfg["hidden_size"],
            "llama.feed_forward_length": cfg["intermediate_size"],
            "llama.attention.head_count": cfg["num_attention_heads"],
            "llama.attention.head_count_kv": cfg["num_key_value_heads"], "llama.vocab_size": cfg["vocab_size"],
            "llama.rope.freq_base": (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta")),
            "llama.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"]}
    for key, v in want.items():
        got = reader.fields[key].contents()
        if not np.isclose(float(got), float(v), rtol=1e-6, atol=0):
            raise ValueError(f"{key}: the original GGUF says {got}, the local config.json {v}")
    if not cfg.get("tie_word_embeddings", False):
        raise ValueError("the local base does not tie its output head to the embedding; this writer expects it")


def write(base_dir: Path, template: Path, out: Path, *, check: bool = True, verbose: bool = True) -> Path:
    """Write ``out`` (an f32 GGUF of ``base_dir``'s weights) unless it is already up to date."""
    import gguf
    from safetensors import safe_open

    from ipa_fast.embedded import sha256_file

    say = print if verbose else (lambda *a, **k: None)
    src = base_dir / "model.safetensors"
    for p in (src, base_dir / "config.json", template):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; run `ipa-fast setup` first")
    src_sha = sha256_file(src)
    record = out.with_name(out.name + ".json")
    if out.is_file() and record.is_file():
        try:
            rec = json.loads(record.read_text())
        except ValueError:
            rec = {}
        if rec.get("source_sha256") == src_sha and rec.get("gguf_bytes") == out.stat().st_size:
            say(f"write_gguf: {out} is up to date (source sha256 {src_sha[:12]})")
            return out
    cfg = json.loads((base_dir / "config.json").read_text())
    reader = gguf.GGUFReader(str(template))
    _check_config(reader, cfg)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"{template}: architecture {arch!r}, this writer handles 'llama'")
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    originals = {t.name: t for t in reader.tensors}

    tensors = {}
    with safe_open(str(src), "np") as f:
        for hf in f.keys():
            if hf == "lm_head.weight":  # tied to the embedding (llama.cpp falls back to token_embd)
                continue
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"{src}: no llama.cpp name for tensor {hf}")
            w = f.get_tensor(hf).astype(np.float32, copy=False)
            if hf.endswith("self_attn.q_proj.weight"):
                w = permute_rope(w, n_head)
            elif hf.endswith("self_attn.k_proj.weight"):
                w = permute_rope(w, n_kv)
            tensors[name] = np.ascontiguousarray(w)
    if set(tensors) != set(originals):
        raise ValueError(f"tensors differ from {template.name}: missing {sorted(set(originals) - set(tensors))[:4]}, "
                         f"extra {sorted(set(tensors) - set(originals))[:4]}")
    if check:  # the local weights are the dequantised original: equal up to fp32 rounding
        for name, w in tensors.items():
            t = originals[name]
            ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            err = float(np.abs(ref - w).max())
            if err > 1e-6 * max(1.0, float(np.abs(ref).max())):
                raise ValueError(f"{name}: differs from the dequantised original by {err} (wrong layout?)")

    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(part), arch)
    for key, field in reader.fields.items():
        if key.startswith(_SKIP) or key == "general.architecture":
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:  # the original's order
        writer.add_tensor(t.name, tensors[t.name], raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(part, out)
    rec = {"source": str(src), "source_sha256": src_sha, "template": template.name,
           "template_sha256": sha256_file(template), "gguf_sha256": sha256_file(out),
           "gguf_bytes": out.stat().st_size, "tensors": len(tensors), "dtype": "f32"}
    record.write_text(json.dumps(rec, indent=2) + "\n")
    say(f"write_gguf: wrote {out} ({rec['gguf_bytes'] / 2**20:.0f} MiB, {len(tensors)} f32 tensors, "
        f"source sha256 {src_sha[:12]})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None, help="HF directory (default: the embedded base)")
    ap.add_argument("--template", type=Path, default=None, help="GGUF whose metadata is copied (default: the original Q4_1)")
    ap.add_argument("--out", type=Path, default=None, help="default: <cache>/models/base-f32.gguf")
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with the dequantised original")
    args = ap.parse_args(argv)
    try:
        base, template, out = default_paths() if None in (args.base, args.template, args.out) else (None,) * 3
        write(args.base or base, args.template or template, args.out or out, check=not args.no_check)
    except (FileNotFoundError, ValueError) as exc:
        print(f"write_gguf: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
