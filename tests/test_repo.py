"""The README's commands, CI and lint: what a newcomer relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert first, "README must open with a code block"
    return [ln for ln in first.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "fuselm demo" in cmds[0]
    assert "pytest" in cmds[1]
    assert cmds[0].startswith("pip install torch==2.13.0") and cmds[1].startswith(
        "pip install torch==2.13.0"
    )


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert _readme_commands()[1] in ci


def test_ruff_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    res = subprocess.run(
        [ruff, "check", *[p for p in ("fuselm", "tests", "bench") if (REPO / p).exists()]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
