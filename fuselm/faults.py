"""Fault injection for the crash-safety tests: die by SIGKILL at a chosen durable step.

Why this lives in the library: a ``kill -9`` test that only kills at random moments mostly
lands in model forward passes. The moments that matter for losing nothing — after a
temporary file is written but before it is renamed, after the last shard but before the
manifest, inside a training checkpoint — are microseconds wide and random kills almost
never hit them. So every durable step of the pipeline calls :func:`point` with a label
like ``"tmp /run/capture/spm/train-00001.parquet"``, and:

- ``FUSELM_FAULT="PATTERN@N"`` makes the process SIGKILL itself at the N-th point (of
  this process) whose label matches the shell-style ``PATTERN`` (``fnmatch``);
- ``FUSELM_FAULT_ACTION=stop`` freezes the process there instead (SIGSTOP: alive, holding
  its lock, doing nothing), for tests of two runs on one run dir;
- ``FUSELM_FAULT_LOG=FILE`` appends every point's label (with the pid) to FILE, so a test
  can choose kill points from an uninterrupted run and check afterwards that no finished
  shard, manifest or checkpointed training step was done twice.

Both are read once per process; unset (always, outside the tests) a point costs one
attribute lookup. Labels: ``tmp PATH`` (temporary file complete, not yet renamed),
``done PATH`` (renamed into place), ``step DIR N`` (training step N finished in memory),
``ckpt DIR N`` (checkpoint of step N complete), ``model DIR`` (final model in place).
"""

from __future__ import annotations

import fnmatch
import os
import signal

FAULT_ENV = "FUSELM_FAULT"
FAULT_LOG_ENV = "FUSELM_FAULT_LOG"
FAULT_ACTION_ENV = "FUSELM_FAULT_ACTION"  # kill (default) | stop: freeze, still alive


class _State:
    """Parsed environment of this process (lazily, so tests can set it before a run)."""

    loaded = False
    pattern: str | None = None
    nth = 0
    seen = 0
    log_path: str | None = None
    action = signal.SIGKILL


def _load() -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec:
        pattern, _, n = spec.rpartition("@")
        if not pattern or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected PATTERN@N with N >= 1")
        _State.pattern, _State.nth = pattern, int(n)
    _State.log_path = os.environ.get(FAULT_LOG_ENV) or None
    action = os.environ.get(FAULT_ACTION_ENV, "kill")
    if action not in ("kill", "stop"):
        raise ValueError(f"{FAULT_ACTION_ENV}={action!r}: expected kill or stop")
    _State.action = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    _State.loaded = True


def reset() -> None:
    """Forget the parsed environment and the match count (tests that change it in-process)."""
    _State.loaded = False
    _State.pattern = None
    _State.nth = 0
    _State.seen = 0
    _State.log_path = None
    _State.action = signal.SIGKILL


def point(label: str) -> None:
    """A durable step happened; log it and die here if ``FUSELM_FAULT`` says so."""
    if not _State.loaded:
        _load()
    if _State.log_path is not None:
        _append(_State.log_path, f"{os.getpid()} {label}\n")
    if _State.pattern is not None and fnmatch.fnmatchcase(label, _State.pattern):
        _State.seen += 1
        if _State.seen == _State.nth:
            if _State.log_path is not None:
                what = "KILL" if _State.action == signal.SIGKILL else "STOP"
                _append(_State.log_path, f"{os.getpid()} {what} {label}\n")
            os.kill(os.getpid(), _State.action)


def _append(path: str, line: str) -> None:
    # One write(2) on an O_APPEND descriptor: the line survives the SIGKILL that may follow.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
