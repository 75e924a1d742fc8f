from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from fuselm.artifacts import (
    Stage,
    StageError,
    ensure_run_dir,
    fingerprint,
    run_lock,
    text_digest,
)


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert text_digest("x") != text_digest("x ")


def _table(n: int = 3) -> pa.Table:
    return pa.table({"x": list(range(n))})


def test_stage_lifecycle(tmp_path):
    comps = {"config": {"k": 1}, "inputs": "abc"}
    st = Stage(tmp_path, "capture/src")
    assert st.status().state == "missing"
    assert st.begin(comps, {"k": 1}, ["s0", "s1"]) == "run"
    st.write_table("s0", _table())
    assert st.status().state == "partial" and "1 of 2" in st.status().detail
    with pytest.raises(StageError, match="not written"):
        st.finish({"rows": 3})
    st.write_table("s1", _table())
    man = st.finish({"rows": 6})
    assert (tmp_path / "capture" / "src" / "manifest.json").exists()
    assert not (tmp_path / "capture" / "src" / "_pending.json").exists()
    assert man["components"] == comps and len(man["shards"]) == 2
    # same inputs: skipped; status done; changed inputs: stale and refused, naming the field
    st2 = Stage(tmp_path, "capture/src")
    assert st2.begin(comps, {}, ["s0", "s1"]) == "skip"
    assert st2.status(comps).state == "done"
    changed = {"config": {"k": 2}, "inputs": "abc"}
    assert st2.status(changed).state == "stale"
    with pytest.raises(StageError, match=r"config\.k: 1 -> 2") as err:
        st2.begin(changed, {}, ["s0"])
    assert "--force" in str(err.value)
    # --force redoes it from scratch
    assert st2.begin(changed, {}, ["s0"], force=True) == "run"
    assert not st2.has_shard("s0") and not st2.has_shard("s1")


def test_resume_keeps_finished_shards_of_the_same_run(tmp_path):
    comps = {"v": 1}
    st = Stage(tmp_path, "x")
    st.begin(comps, {}, ["a", "b"])
    st.write_table("a", _table())
    mtime = st.shard_path("a").stat().st_mtime_ns
    # an interrupted run with different inputs is not resumed silently
    with pytest.raises(StageError, match="different inputs"):
        Stage(tmp_path, "x").begin({"v": 2}, {}, ["a", "b"])
    st = Stage(tmp_path, "x")
    assert st.begin(comps, {}, ["a", "b"]) == "run"
    assert st.has_shard("a") and st.shard_path("a").stat().st_mtime_ns == mtime


def test_failed_shard_write_leaves_nothing(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    st = Stage(tmp_path, "x")
    st.begin({"v": 1}, {}, ["a"])

    def broken(table, path, **kw):
        with open(path, "wb") as f:
            f.write(b"PAR1 half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(StageError, match="cannot write .*a.parquet: No space left") as e:
        st.write_table("a", _table())
    assert isinstance(e.value.__cause__, OSError) and "rerun the same command" in str(e.value)
    assert not st.has_shard("a")
    assert [p.name for p in st.path.iterdir() if ".tmp-" in p.name] == []


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="not a fuselm run directory"):
        ensure_run_dir(tmp_path)
    fresh = tmp_path / "new"
    ensure_run_dir(fresh)
    ensure_run_dir(fresh)  # idempotent
    assert (fresh / "fuselm-run.json").exists()


REPO = Path(__file__).resolve().parents[1]

# A process that takes the run-dir lock, says so, then waits (or, with a start file, waits
# for it first so that several start at the same moment, and reports whether it got it).
_HOLDER = """
import os, sys, time
from pathlib import Path
from fuselm.artifacts import StageError, run_lock
run_dir, start, hold = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
while start and not os.path.exists(start):
    time.sleep(0.001)
try:
    with run_lock(run_dir):
        print("got", flush=True)
        time.sleep(hold)
except StageError as e:
    print("refused", e, flush=True)
"""


def _holder(run_dir: Path, start: str = "", hold: float = 60) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "-c", _HOLDER, str(run_dir), start, str(hold)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
    holder = _holder(tmp_path)
    try:
        assert holder.stdout.readline().strip() == "got"
        with pytest.raises(StageError, match=f"in use by process {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (tmp_path / ".lock").read_text() == str(holder.pid)
    with run_lock(tmp_path):  # its owner is dead: the kernel dropped the lock
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_lock_held_before_its_pid_is_written_is_still_held(tmp_path):
    """The race a pid file loses: the holder created the file but wrote no pid yet."""
    import fcntl

    fd = os.open(tmp_path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StageError, match="in use by another process"):
            with run_lock(tmp_path):
                pass
        assert (tmp_path / ".lock").read_text() == ""  # not taken over, not rewritten
    finally:
        os.close(fd)


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_lock_has_one_winner_among_simultaneous_starts(tmp_path):
    start = tmp_path / "go"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("999999999")  # a stale lock from a dead process
    procs = [_holder(run_dir, str(start), hold=3) for _ in range(6)]
    time.sleep(1.5)  # let every interpreter start and poll for the start file
    start.write_text("")
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["got"] + ["refused"] * 5, outs
    assert not (run_dir / ".lock").exists()


def test_corrupt_manifest_names_the_file(tmp_path):
    st = Stage(tmp_path, "x")
    st.path.mkdir(parents=True)
    (st.path / "manifest.json").write_text("{not json")
    with pytest.raises(StageError, match="manifest.json is unreadable"):
        st.manifest()
