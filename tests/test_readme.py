"""README.md is true as written: its API tour runs, its command lines parse, its links resolve.

- Every ```python block runs, in order, in one shared namespace (the tour builds on itself), in a
  temporary working directory, on one torch thread. The blocks before the first one that uses
  ``embedded.`` (the sampler, ``sample_experts``, the ops, on small random tensors) always run.
  From that block on they need the embedded default (the base and adapter-init built by
  ``ipa-fast setup``) and are skipped, saying which asset is missing, when it is not there.
  Nothing reaches the network: the API-base block starts the bundled server on 127.0.0.1.
- Every ``ipa-fast ...`` command line (in ```bash blocks and in inline code) parses with
  ``ipa_fast.cli.main.build_parser()`` (parsing only; paths it names are created empty in a
  temporary directory first, since some flags check that they exist).
- Every ``make X`` shown is a Makefile target; every relative link points to a file in the
  repository and every ``#anchor`` to a heading.
Blocks meant not to run (a vLLM command line, shell) are fenced as ```bash or ```text.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
NEEDS_EMBEDDED = re.compile(r"\bembedded\.")

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(lang: str | None = None) -> list[tuple[int, str, str]]:
    """``(line, lang, code)`` of every fenced block (indentation of a list item removed)."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        code = "".join(line[indent:] if line[:indent].strip() == "" else line
                       for line in m.group("body").splitlines(keepends=True))
        if lang is None or m.group("lang") == lang:
            out.append((text.count("\n", 0, m.start()) + 1, m.group("lang"), code))
    return out


def python_blocks() -> tuple[list, list]:
    """The tour split into ``(core, embedded)``: the blocks before and from the first block
    that uses the embedded default."""
    py = blocks("python")
    first = next((i for i, (_, _, code) in enumerate(py) if NEEDS_EMBEDDED.search(code)), len(py))
    return py[:first], py[first:]


def run_blocks(tour, namespace: dict) -> None:
    for line, _, code in tour:
        exec(compile(code, f"README.md (python block at line {line})", "exec"), namespace)


def test_readme_has_a_tour():
    core, emb = python_blocks()
    assert core, "README.md has no python block that runs without the embedded default"
    assert emb, "README.md has no python block on the embedded default"
    assert not [line for line, lang, _ in blocks() if lang == ""], \
        "every fenced block names its language (python runs; bash / text do not)"


def test_core_blocks_run(tmp_path, monkeypatch):
    core, _ = python_blocks()
    monkeypatch.chdir(tmp_path)
    run_blocks(core, {"__name__": "__readme__"})


def embedded_missing() -> str | None:
    from ipa_fast import embedded

    for fn in (embedded.base_path, embedded.adapter_init_path):
        try:
            fn()
        except FileNotFoundError as exc:
            return str(exc)
    return None


def test_embedded_blocks_run(tmp_path, monkeypatch):
    missing = embedded_missing()
    if missing:
        pytest.skip(f"the README's tour on the embedded default needs `ipa-fast setup`: {missing}")
    core, emb = python_blocks()
    monkeypatch.chdir(tmp_path)
    run_blocks(core + emb, {"__name__": "__readme__"})


# ----------------------------------------------------------------------------- command lines

PATH_FLAGS = {"--adapter": "dir", "--base": "dir", "--tokenizer": "dir", "--prompts": "file",
              "--eval-prompts": "file"}


def command_lines() -> list[str]:
    """Every ``ipa-fast ...`` command: logical lines of bash blocks (continuations joined,
    ``VAR=value`` prefixes dropped) and inline code spans."""
    cmds = []
    for _, _, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]
            if words and words[0] == "ipa-fast":
                cmds.append(shlex.join(words))
    text = FENCE.sub("", README.read_text(encoding="utf-8"))
    cmds += re.findall(r"`(ipa-fast [^`]*)`", text)
    return cmds


def test_command_lines_parse(tmp_path, monkeypatch):
    from ipa_fast.cli.main import build_parser

    cmds = command_lines()
    assert len(cmds) >= 15, cmds  # the command-line section is there and was found
    monkeypatch.chdir(tmp_path)
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        for flag, value in zip(argv, argv[1:]):  # paths the parser checks for existence
            kind = PATH_FLAGS.get(flag)
            if kind and not value.startswith("-"):
                p = Path(value).expanduser()
                if not p.exists():
                    if kind == "dir":
                        p.mkdir(parents=True)
                    else:
                        p.parent.mkdir(parents=True, exist_ok=True)
                        p.write_text("a prompt\n")
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # --version / --help exit 0; a parse error exits 2
            assert exc.code == 0, f"README command does not parse: {cmd}"


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+):", makefile, re.MULTILINE))
    shown = {w for _, _, code in blocks("bash") for w in re.findall(r"^make ([\w-]+)", code, re.MULTILINE)}
    shown |= set(re.findall(r"`make ([\w-]+)`", README.read_text(encoding="utf-8")))
    assert shown, "README.md shows no make target"
    assert shown <= targets, f"not Makefile targets: {sorted(shown - targets)}"


# ----------------------------------------------------------------------------- links

def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_resolve():
    text = README.read_text(encoding="utf-8")
    prose = FENCE.sub("", text)
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", prose, re.MULTILINE)}
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links, "README.md has no links"
    bad = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # http(s), mailto: outside the repository
            continue
        path, _, anchor = link.partition("#")
        if path:
            target = (ROOT / path).resolve()
            if ROOT not in target.parents or not target.exists():
                bad.append(link)
        elif anchor not in anchors:
            bad.append(link)
    assert not bad, f"README links to nothing: {bad}"
