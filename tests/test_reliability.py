"""Faults other than kill -9: two runs on one run dir, a full disk, and security rules.

Kill -9: tests/test_crash.py; changed inputs: tests/test_stale.py; bad inputs:
tests/test_bad_inputs.py (with docs/bad-inputs.md).
"""

from __future__ import annotations

import ast
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import crash_harness as h
import pytest

from fuselm.cli import main

REPO = Path(__file__).resolve().parents[1]


def _small(base_config, write_config, **train):
    cfg = dict(base_config, sources=base_config["sources"][:1])
    cfg["corpus"] = dict(cfg["corpus"], blocks_per_shard=40)
    cfg["capture"] = {"blocks_per_shard": 40}
    return write_config(cfg)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fuselm", "-q", *args],
        env={**h.env(), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


# --------------------------------------------------------------------------- two runs


def test_second_run_is_refused_and_a_dead_owners_lock_is_taken_over(
    base_config, write_config, tmp_path
):
    cfg = _small(base_config, write_config)
    run_dir = tmp_path / "run"
    log = tmp_path / "events.log"
    # Process A freezes (SIGSTOP: alive, holding the lock) in the middle of prepare.
    env = h.env(fault=f"done {run_dir}/prepare/train-00000.parquet@1", log=log)
    env["FUSELM_FAULT_ACTION"] = "stop"
    a = subprocess.Popen(
        [sys.executable, "-m", "fuselm", "-q", "run", str(cfg), "-o", str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and "STOP" in log.read_text()):
            assert a.poll() is None and time.monotonic() < deadline, "A never reached prepare"
            time.sleep(0.2)
        # B: the same command while A lives -> refused, naming A's pid; A's files untouched
        before = sorted(p.name for p in (run_dir / "prepare").iterdir())
        b = _cli("run", str(cfg), "-o", str(run_dir))
        assert b.returncode == 1
        assert f"is in use by process {a.pid}" in b.stderr and "Traceback" not in b.stderr
        assert sorted(p.name for p in (run_dir / "prepare").iterdir()) == before
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert (run_dir / ".lock").read_text() == str(a.pid)  # A died holding it: a stale lock
    c = _cli("prepare", "-c", str(cfg), "-o", str(run_dir))
    assert c.returncode == 0, c.stderr
    assert not (run_dir / ".lock").exists()
    assert (run_dir / "prepare" / "manifest.json").exists()
    assert h.leftovers(run_dir) == []


# --------------------------------------------------------------------------- disk full


def test_disk_full_during_a_shard_write(base_config, write_config, tmp_path, monkeypatch, capsys):
    """A patched writer raises ENOSPC half-way through the third capture shard."""
    import pyarrow.parquet as pq

    small = dict(base_config, sources=base_config["sources"][:1])  # the spm source only
    small["target"] = dict(small["target"], as_source=False)
    small["corpus"] = dict(small["corpus"], inputs=small["corpus"]["inputs"][1:])  # jsonl
    small["capture"] = {"blocks_per_shard": 3}
    cfg = write_config(small)
    run_dir = tmp_path / "run"
    assert main(["-q", "prepare", "-c", str(cfg), "-o", str(run_dir)]) == 0
    clean = tmp_path / "clean"  # the same capture, never interrupted
    shutil.copytree(run_dir, clean)
    assert main(["-q", "capture", "-c", str(cfg), "-o", str(clean)]) == 0

    real = pq.write_table
    calls = []

    def full_disk(table, where, **kw):
        if "/capture/spm/" in str(where):
            calls.append(where)
            if len(calls) == 3:
                Path(where).write_bytes(b"PAR1 half a shard")  # what a full disk leaves
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    capsys.readouterr()
    assert main(["-q", "capture", "-c", str(cfg), "-o", str(run_dir)]) == 1
    err = capsys.readouterr().err
    spm = run_dir / "capture" / "spm"
    assert f"cannot write {spm}/" in err and "No space left on device" in err
    assert "free some space" in err and "rerun the same command" in err
    assert "Traceback" not in err
    assert h.leftovers(run_dir) == [f"capture/spm/{h.PENDING}"]  # resumable, nothing partial
    done = {p.name: p.stat().st_mtime_ns for p in spm.glob("*.parquet")}
    assert len(done) == 2

    monkeypatch.setattr(pq, "write_table", real)  # space freed
    assert main(["-q", "capture", "-c", str(cfg), "-o", str(run_dir)]) == 0
    assert h.leftovers(run_dir) == []
    for name, mtime in done.items():  # finished shards were kept, not rewritten
        assert (spm / name).stat().st_mtime_ns == mtime
    for shard in (clean / "capture" / "spm").glob("*.parquet"):
        assert (spm / shard.name).read_bytes() == shard.read_bytes()


def test_disk_full_on_a_real_small_filesystem(base_config, write_config, tmp_path):
    """The run dir on a 400 KB tmpfs: the run stops with ENOSPC, then resumes once bigger."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        cfg = _small(base_config, write_config)
        run_dir = mnt / "run"
        first = _cli("run", str(cfg), "-o", str(run_dir))
        assert first.returncode == 1, first.stderr
        assert "No space left on device" in first.stderr and "free some space" in first.stderr
        assert "Traceback" not in first.stderr
        left = h.leftovers(run_dir)
        assert all(x.endswith(h.PENDING) for x in left), left  # no temporary, no half shard
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        second = _cli("run", str(cfg), "-o", str(run_dir))
        assert second.returncode == 0, second.stderr
        assert h.leftovers(run_dir) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --------------------------------------------------------------------------- security


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f"{f.value.id}.{f.attr}"
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else getattr(f, "id", getattr(f, "attr", ""))
            )
            yield name, node


def test_no_code_execution_paths_in_the_library():
    """torch.load only with weights_only=True; no pickle, eval/exec, unsafe YAML, literal
    trust_remote_code=True; accelerate's load_state told weights_only explicitly."""
    problems = []
    load_state_calls = 0
    for path in sorted((REPO / "fuselm").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(REPO)
        for name, node in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            line = f"{rel}:{node.lineno}"
            if name == "torch.load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{line}: torch.load without weights_only=True")
            builtin = isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile")
            if builtin or name in ("pickle.load", "pickle.loads", "marshal.loads"):
                problems.append(f"{line}: {name}")
            if name == "yaml.load" and "Loader" not in kw:
                problems.append(f"{line}: yaml.load without a (safe) Loader")
            if name == "yaml.unsafe_load":
                problems.append(f"{line}: {name}")
            pickle_ok = kw.get("allow_pickle")
            if name == "np.load" and not (
                isinstance(pickle_ok, ast.Constant) and pickle_ok.value is False
            ):
                problems.append(f"{line}: np.load without allow_pickle=False")
            tr = kw.get("trust_remote_code")
            if isinstance(tr, ast.Constant) and tr.value is True:
                problems.append(f"{line}: trust_remote_code=True hard-coded")
            if name.endswith("load_state"):
                load_state_calls += 1
                lk = kw.get("load_kwargs")
                if not (isinstance(lk, ast.Dict) and "weights_only" in ast.unparse(lk)):
                    problems.append(f"{line}: load_state without weights_only")
    assert problems == []
    assert load_state_calls >= 1  # the train resume path was checked
    # the one yaml.load (lm-eval task files) uses a SafeLoader that keeps tags as data
    import yaml

    from fuselm.lmeval import _yaml_classes

    assert issubclass(_yaml_classes()[0], yaml.SafeLoader)


def test_model_trust_is_off_by_default_and_recorded(base_config, write_config, tmp_path):
    import json

    from fuselm.config import ModelConfig

    assert ModelConfig(model="x").trust_remote_code is False
    assert ModelConfig(model="x").allow_pickle is False
    cfg = dict(base_config, sources=base_config["sources"][:1])
    cfg["sources"] = [dict(cfg["sources"][0], allow_pickle=True)]
    path = write_config(cfg)
    run_dir = tmp_path / "run"
    assert main(["-q", "prepare", "-c", str(path), "-o", str(run_dir)]) == 0
    marker = json.loads((run_dir / "fuselm-run.json").read_text())
    assert marker["models"]["tgt"]["trust_remote_code"] is False
    assert marker["models"]["spm"] == {
        "model": cfg["sources"][0]["model"],
        "trust_remote_code": False,
        "allow_pickle": True,
    }


def test_config_paths_are_relative_to_the_config_file(base_config, tmp_path, monkeypatch):
    """A config moved with its data works from any working directory."""
    import yaml

    proj = tmp_path / "proj"
    shutil.copytree(Path(base_config["corpus"]["inputs"][0]["path"]).parent, proj / "data")
    shutil.copytree(base_config["target"]["model"], proj / "models" / "tgt")
    cfg = {
        "corpus": {"inputs": [{"path": "data/docs.jsonl"}], "block_tokens": 64},
        "target": {"model": "models/tgt", "name": "tgt"},
        "run_dir": "runs/one",
    }
    (proj / "run.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["-q", "prepare", "-c", str(proj / "run.yaml")]) == 0
    assert (proj / "runs" / "one" / "prepare" / "manifest.json").exists()
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran
