#!/usr/bin/env bash
# A newcomer's first hour, scripted: a fresh clone of this checkout's HEAD, the README's two
# commands (the demo in --quick form), every README snippet and CLI example (tests/test_readme.py),
# every CLI error path (tests/test_cli_errors.py) and the installed wheel run outside the repository
# (tests/test_wheel.py). Any traceback or failed step fails the run. Slow (it builds everything):
# `make newcomer`; the cache is the user's (IPA_FAST_HOME), so a built base is reused.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/ipa_fast"
cd "$work/ipa_fast"
log="$work/newcomer.log"
make install >"$log" 2>&1 || { tail -20 "$log"; exit 1; }
.venv/bin/ipa-fast --version
.venv/bin/ipa-fast setup
.venv/bin/ipa-fast demo --quick --out "$work/demo" 2>&1 | tee -a "$log"
if grep -q "Traceback" "$log"; then echo "newcomer: a traceback was printed"; exit 1; fi
.venv/bin/python -m pytest -q tests/test_readme.py tests/test_cli_errors.py
IPA_FAST_WHEEL_TEST=1 .venv/bin/python -m pytest -q tests/test_wheel.py
echo "newcomer: fresh clone -> install -> setup -> demo --quick -> README snippets -> CLI errors -> wheel: all passed"
