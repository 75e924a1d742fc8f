"""Helpers shared by the bench scripts (measurement plumbing, not figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence


def peak_memory_per_variant(script: str, argv: Sequence[str], variants: Sequence[str]) -> dict:
    """Run ``script argv --memory-of V`` in a fresh process per variant; collect peak bytes.

    A fresh process per variant keeps one variant's freed memory from hiding another's
    peak. A fixed glibc mmap threshold maps and unmaps large blocks, so RSS follows the
    live tensors (with the default, freed heap is reused and peaks are undercounted). The
    child prints ``{"peak_bytes": N}`` as its last line.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    peak = {}
    for variant in variants:
        cmd = [sys.executable, script, *argv, "--memory-of", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        peak[variant] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    return peak
