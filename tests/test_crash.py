"""Kill -9 anywhere: `fuselm run` SIGKILLed at seeded points of every stage, restarted until
done, ends with the same artifacts as an uninterrupted run, nothing half-written, and no
finished work done twice. Helpers and the definition of "identical": tests/crash_harness.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import crash_harness as h
import pytest

from fuselm import faults
from fuselm.testing import TINY_RUN_STAGES


def _config(base_config, write_config):
    cfg = dict(base_config, sources=base_config["sources"][:1])  # target + spm source
    cfg["corpus"] = dict(cfg["corpus"], blocks_per_shard=40)  # ~10 shards per stage
    cfg["capture"] = {"blocks_per_shard": 40}
    cfg["train"] = dict(cfg["train"], max_steps=4, save_steps=1)  # a checkpoint per step
    return write_config(cfg)


@pytest.fixture
def reference(base_config, write_config, tmp_path):
    """An uninterrupted run (moved to ``ref/``) and its event trace; the killed runs reuse
    the same run-dir path, so that paths recorded in manifests are comparable."""
    cfg = _config(base_config, write_config)
    run_dir = tmp_path / "run"
    log = tmp_path / "ref-events.log"
    t0 = time.monotonic()
    code, out = h.run(cfg, run_dir, log=log)
    seconds = time.monotonic() - t0
    assert code == 0, out[-3000:]
    assert h.leftovers(run_dir) == []
    events = h.read_events(log)
    hashes = h.content_hashes(run_dir)
    shutil.move(run_dir, tmp_path / "ref")
    return {"cfg": cfg, "run_dir": run_dir, "events": events, "hashes": hashes, "s": seconds}


def _check_same_as_reference(ref, log):
    run_dir = ref["run_dir"]
    assert h.leftovers(run_dir) == []
    got = h.content_hashes(run_dir)
    assert sorted(got) == sorted(ref["hashes"]), set(got) ^ set(ref["hashes"])
    differ = [k for k in got if got[k] != ref["hashes"][k]]
    assert differ == [], differ
    events = h.read_events(log)
    outside = [
        e.label
        for e in events
        if e.kind not in ("KILL", "STOP") and not Path(e.rest.split(" ")[0]).is_relative_to(run_dir)
    ]
    assert outside == [], outside  # nothing was ever written outside the run dir
    redo = h.redone_work(events, run_dir)
    assert redo.files == {}, redo.files
    assert redo.steps_redone_before_checkpoint == []
    return redo


@pytest.mark.slow
def test_kill_at_seeded_points_of_every_stage(reference, tmp_path, capsys):
    labels = h.choose_kill_points(reference["events"], reference["run_dir"], seed=8, per_stage=1)
    stages = {h.stage_of(lb.split(" ", 1)[1], reference["run_dir"]) for lb in labels}
    assert stages >= set(TINY_RUN_STAGES)
    log = tmp_path / "events.log"
    res = h.kill_chain(reference["cfg"], reference["run_dir"], labels, log)
    assert res.missed == [], res.missed
    assert res.kills == len(labels) >= 20
    redo = _check_same_as_reference(reference, log)
    with capsys.disabled():
        print(
            f"\n[crash] {res.kills} kill points survived over {res.kill_stages}; "
            f"train steps redone after their last checkpoint: {redo.steps_after_checkpoint}; "
            f"uninterrupted run {reference['s']:.1f}s"
        )


@pytest.mark.slow
def test_kill_at_seeded_random_times(reference, tmp_path, capsys):
    log = tmp_path / "events.log"
    landed = h.random_kills(
        reference["cfg"], reference["run_dir"], seed=8, horizon=reference["s"] / 3, log=log, n=8
    )
    assert len(landed) >= 5, landed  # most of the kills must hit a running pipeline
    redo = _check_same_as_reference(reference, log)
    with capsys.disabled():
        print(f"\n[crash] random kills landed: {landed}; redone: {redo.steps_after_checkpoint}")


# --------------------------------------------------------------------------- fast checks


def test_fault_hook_kills_at_the_nth_matching_point(tmp_path):
    log = tmp_path / "ev.log"
    code = (
        "from fuselm import faults\n"
        "for i in range(5):\n"
        "    faults.point(f'done /x/shard-{i}.parquet')\n"
        "print('survived')\n"
    )
    env = h.env(fault="done */shard-*.parquet@3", log=log)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL and "survived" not in p.stdout
    lines = log.read_text().splitlines()
    assert [ln.split(" ", 1)[1] for ln in lines] == [
        "done /x/shard-0.parquet",
        "done /x/shard-1.parquet",
        "done /x/shard-2.parquet",
        "KILL done /x/shard-2.parquet",
    ]


def test_fault_hook_is_inert_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    monkeypatch.delenv(faults.FAULT_LOG_ENV, raising=False)
    faults.reset()
    for _ in range(3):
        faults.point("done /x")  # nothing happens, nothing is written
    monkeypatch.setenv(faults.FAULT_ENV, "no-count")
    faults.reset()
    with pytest.raises(ValueError, match="PATTERN@N"):
        faults.point("done /x")
    faults.reset()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from fuselm.artifacts import Stage

    stage = Stage(tmp_path, "capture/a")
    stage.begin({"a": 1}, {}, ["s-0"])  # an interrupted run: the next begin resumes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = stage.path / f".s-0.parquet.tmp-{dead.pid}"
    live = stage.path / f".s-1.parquet.tmp-{os.getppid()}"  # a live process (our parent)
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    stage.begin({"a": 1}, {}, ["s-0"])
    assert not stale.exists() and live.exists()
