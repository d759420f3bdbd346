#!/usr/bin/env python
"""Build the embedded English corpus from Debian packages (reproducible, idempotent).

Sources (fetched with ``apt-get download``, unpacked with ``dpkg -x``; nothing is installed):
  * ``wordnet-base`` (WordNet 3.0 licence, permissive): the example sentences quoted inside
    the glosses of ``data.{noun,verb,adj,adv}``, and the glosses themselves written as
    ``lemma: definition.`` lines;
  * ``fortunes`` (BSD-licensed program; the cookies are collected quotations, mostly public
    domain, see data/README.md) minus the ASCII-art, song-lyric and Pratchett files;
  * ``fortunes-bofh-excuses`` (public domain).
Debian has no English ``fortunes-off`` any more (only es/it), so it is not used.
``dict-gcide`` is avoided on purpose (GPL-3).

Every document becomes one line (whitespace collapsed).  Lines are deduplicated on a
normalised key and split by a hash of that key (90 / 5 / 5 % train / validation / test), so
the split of a line never depends on which other lines exist.  Output, gzip-compressed with a
fixed mtime so the bytes are reproducible:

    data/corpus/{train,validation,test}.txt.gz  and  data/corpus/MANIFEST.json

Usage:  python scripts/build_corpus.py [--out data/corpus] [--cache /tmp/ipa_fast_debs]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = {
    "wordnet-base": "WordNet 3.0 licence (permissive, BSD-like; notice must be kept)",
    "fortunes": "BSD (program); cookies are collected quotations, mostly public domain",
    "fortunes-bofh-excuses": "public domain",
}
# Fortune files left out: pictures, song lyrics (copyrighted), quotations of one living author.
FORTUNE_EXCLUDE = {"ascii-art", "songs-poems", "pratchett"}
SPLITS = ("train", "validation", "test")


def fetch(pkg: str, cache: Path) -> tuple[Path, str]:
    """Download and unpack a Debian package into the cache; return (root, version)."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{pkg}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
        debs = sorted(cache.glob(f"{pkg}_*.deb"))
    deb = debs[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    root = cache / f"{pkg}-root"
    if not root.exists():
        tmp = cache / f"{pkg}-root.tmp"
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
        os.replace(tmp, root)
    return root, version


def clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\t", " ").replace("``", '"').replace("''", '"')
    return re.sub(r"\s+", " ", text).strip()


def wordnet_lines(root: Path):
    """Yield (kind, line): quoted example sentences and 'lemma: gloss.' lines."""
    wn = root / "usr/share/wordnet"
    for pos in ("noun", "verb", "adj", "adv"):
        with open(wn / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for raw in f:
                if raw.startswith("  ") or " | " not in raw:
                    continue  # licence header
                head, gloss = raw.rstrip("\n").split(" | ", 1)
                fields = head.split()
                lemma = fields[4].replace("_", " ")
                lemma = re.sub(r"\(.*?\)$", "", lemma)  # adjective markers like (a)
                examples = re.findall(r'"([^"]+)"', gloss)
                for ex in examples:
                    ex = clean(ex)
                    if len(ex.split()) >= 3:
                        yield "wordnet-example", ex
                definition = clean(re.sub(r'"[^"]*"', "", gloss).strip(" ;"))
                definition = definition.rstrip(";: ")
                if definition:
                    yield "wordnet-gloss", f"{lemma}: {definition}."


def fortune_lines(root: Path, source: str):
    d = root / "usr/share/games/fortunes"
    for path in sorted(d.iterdir()):
        if path.suffix or path.name in FORTUNE_EXCLUDE or not path.is_file():
            continue  # .dat / .u8 indexes and links, excluded files
        text = path.read_text(encoding="latin-1")
        for cookie in re.split(r"^%\s*$", text, flags=re.M):
            line = clean(cookie)
            if 20 <= len(line) <= 600 and sum(c.isalpha() for c in line) > 0.6 * len(line):
                yield source, line


def split_of(key: str) -> str:
    b = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if b < 90 else "validation" if b < 95 else "test"


def norm_key(line: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", line.lower()).strip()


def write_gz(path: Path, lines: list[str]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write("".join(l + "\n" for l in lines).encode("utf-8"))
    data = buf.getvalue()
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "data/corpus"))
    ap.add_argument("--cache", default=os.environ.get("IPA_FAST_DEB_CACHE", "/tmp/ipa_fast_debs"))
    args = ap.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)

    versions, counts = {}, {}
    seen: set[str] = set()
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for pkg in PACKAGES:
        root, versions[pkg] = fetch(pkg, cache)
        gen = wordnet_lines(root) if pkg == "wordnet-base" else fortune_lines(root, pkg)
        for kind, line in gen:
            key = norm_key(line)
            if not key or key in seen:
                continue
            seen.add(key)
            counts[kind] = counts.get(kind, 0) + 1
            splits[split_of(key)].append(line)

    from ipa_fast.decoding.tokenizer import load_gpt2_tokenizer, tokenizer_hash

    tok = load_gpt2_tokenizer()
    manifest = {
        "description": "English text for the embedded base model; one document per line, "
                       "gzip-compressed UTF-8. Built by scripts/build_corpus.py.",
        "sources": {p: {"debian_package": p, "version": versions[p], "licence": PACKAGES[p]}
                    for p in PACKAGES},
        "documents_by_kind": counts,
        "split_rule": "sha256(normalised line) % 100: <90 train, <95 validation, else test",
        "tokenizer_sha256": tokenizer_hash(tok),
        "splits": {},
    }
    for s in SPLITS:
        lines = splits[s]
        data = write_gz(out / f"{s}.txt.gz", lines)
        n_tok = sum(len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"])
        manifest["splits"][s] = {
            "file": f"{s}.txt.gz",
            "sha256": hashlib.sha256(data).hexdigest(),
            "lines": len(lines),
            "tokens": n_tok,
            "bytes_uncompressed": sum(len(l.encode()) + 1 for l in lines),
        }
        print(f"{s}: {len(lines)} lines, {n_tok} tokens, {len(data)} bytes gz")
    tmp = out / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "MANIFEST.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
