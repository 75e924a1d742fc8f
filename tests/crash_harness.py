"""Kill -9 harness for `fuselm run`: kill points, restarts, and the comparison of run dirs.

Used by tests/test_crash.py. Why a separate module: the same helpers serve the
deterministic kill chain (``FUSELM_FAULT``, see :mod:`fuselm.faults`), the seeded
random-time kills and the checks that follow both.

What "identical" means here (one source of truth: :func:`normalise` and :data:`VOLATILE`).
Every file of the finished run dir is compared by SHA-256, with three kinds of exceptions,
each because the value records *when* or *how* a run happened, not *what* it produced:

- manifest/stat keys in :data:`VOLATILE`: ``finished`` and ``created`` (timestamps of
  a stage's end and of the run dir's marker ``fuselm-run.json``), ``seconds`` and
  ``*_per_second`` (wall time), ``resumed_from`` (the step a resumed train started at:
  0 in an uninterrupted run by definition), ``cached`` (whether the vocabulary map came from
  the cache, which a resumed align does by design);
- ``time`` in the lines of ``train/*/log.jsonl`` (seconds since the process started);
- nothing else: shards, models, tokenizers, eval results, report text and plots must be
  byte-identical.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PENDING = "_pending.json"
VOLATILE = ("finished", "created", "seconds", "resumed_from", "cached")
VOLATILE_SUFFIX = "_per_second"


def env(fault: str | None = None, log: Path | None = None) -> dict[str, str]:
    """Environment of a `fuselm` subprocess: offline, one thread, optional fault hook."""
    e = dict(os.environ)
    e.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        FUSELM_QUIET="1",
    )
    e.pop("FUSELM_FAULT", None)
    if fault:
        e["FUSELM_FAULT"] = fault
    if log:
        e["FUSELM_FAULT_LOG"] = str(log)
    return e


def start(cfg: Path, run_dir: Path, fault: str | None = None, log: Path | None = None):
    """Start `fuselm run` (not waiting)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fuselm", "-q", "run", str(cfg), "-o", str(run_dir)],
        env=env(fault, log),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run(cfg: Path, run_dir: Path, fault: str | None = None, log: Path | None = None):
    """Run `fuselm run` to its end; returns (exit code, output)."""
    p = start(cfg, run_dir, fault, log)
    out, _ = p.communicate(timeout=900)
    return p.returncode, out


# --------------------------------------------------------------------------- events


@dataclass
class Event:
    """One line of a FUSELM_FAULT_LOG: the process, the kind and the rest of the label."""

    pid: int
    kind: str  # tmp | done | step | ckpt | model | KILL
    rest: str

    @property
    def label(self) -> str:
        return f"{self.kind} {self.rest}"


def read_events(log: Path) -> list[Event]:
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        pid, kind, rest = line.split(" ", 2)
        out.append(Event(int(pid), kind, rest))
    return out


def stage_of(label_rest: str, run_dir: Path) -> str:
    """The stage folder an event belongs to (``capture/spm``, ``train/fused``, ...)."""
    path = label_rest.split(" ")[0]
    rel = Path(path).relative_to(run_dir).parts
    if not rel or rel[0] in ("fuselm-run.json",):
        return "run"
    if rel[0] in ("capture", "align", "train") and len(rel) > 1 and "." not in rel[1]:
        return f"{rel[0]}/{rel[1]}"
    return rel[0]


def choose_kill_points(events: list[Event], run_dir: Path, seed: int, per_stage: int) -> list[str]:
    """Seeded kill points over every stage of an uninterrupted run's event trace.

    Per stage folder: the moment its manifest is in place (the next process must skip the
    stage), the final-model rename of a training variant, and ``per_stage`` random others.
    Returned in trace order as exact labels (each is hit at its first occurrence).
    """
    rng = random.Random(seed)
    by_stage: dict[str, list[int]] = defaultdict(list)
    for i, ev in enumerate(events):
        by_stage[stage_of(ev.rest, run_dir)].append(i)
    chosen: set[int] = set()
    for stage, idx in by_stage.items():
        if stage == "run":
            continue
        must = [
            i
            for i in idx
            if (events[i].kind == "done" and events[i].rest.endswith("/manifest.json"))
            or events[i].kind == "model"
        ]
        chosen.update(must)
        # Not "done .../trainer_state.json": the "ckpt" point right after it is the same
        # moment (nothing durable in between), and a kill at one makes the other
        # unreachable in the restarted process (it resumes past that checkpoint).
        rest = [
            i
            for i in idx
            if i not in chosen
            and not (events[i].kind == "done" and events[i].rest.endswith("/trainer_state.json"))
        ]
        chosen.update(rng.sample(rest, min(per_stage, len(rest))))
    return [events[i].label for i in sorted(chosen)]


def fault_spec(label: str) -> str:
    return glob.escape(label) + "@1"


# --------------------------------------------------------------------------- checks


def normalise(path: Path) -> bytes:
    """The bytes of a run-dir file with volatile fields removed (see module docstring)."""
    data = path.read_bytes()
    if path.name == "log.jsonl":
        lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
        for x in lines:
            x.pop("time", None)
        return json.dumps(lines, sort_keys=True).encode()
    if path.suffix == ".json" and path.parent.name != "model":
        return json.dumps(_drop_volatile(json.loads(data)), sort_keys=True).encode()
    return data


def _drop_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: _drop_volatile(v)
            for k, v in obj.items()
            if k not in VOLATILE and not k.endswith(VOLATILE_SUFFIX)
        }
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def content_hashes(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a run dir (normalised), by relative path."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(normalise(p)).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def leftovers(run_dir: Path) -> list[str]:
    """Anything a finished run must not contain: temporaries, pending records, a lock,
    checkpoints, unreadable shards."""
    import pyarrow.parquet as pq

    bad = []
    for p in run_dir.rglob("*"):
        rel = str(p.relative_to(run_dir))
        if ".tmp" in p.name or p.name in ("_pending.json", ".lock", "checkpoints"):
            bad.append(rel)
        elif p.suffix == ".parquet":
            try:
                pq.read_metadata(p)
            except Exception as e:  # a half-written shard
                bad.append(f"{rel}: {e}")
    return sorted(bad)


@dataclass
class Redo:
    """Work done more than once across the processes of one killed-and-restarted run."""

    files: dict[str, int] = field(default_factory=dict)  # shard/manifest -> times renamed
    steps_after_checkpoint: list[str] = field(default_factory=list)  # legitimately redone
    steps_redone_before_checkpoint: list[str] = field(default_factory=list)  # must be empty


def redone_work(events: list[Event], run_dir: Path) -> Redo:
    """What finished work the processes of a run did twice.

    Finished work: a shard (``.parquet``/``.npz``) or a stage manifest renamed into
    place (the report is rebuilt on every run by design and left out), and a training
    step covered by a complete checkpoint. Steps after the last checkpoint are redone
    after a kill by design; they are counted separately.
    """
    out = Redo()
    renamed: dict[str, int] = defaultdict(int)
    last_ckpt: dict[str, int] = defaultdict(int)
    finished: set[str] = set()
    for ev in events:
        if ev.kind == "done":
            rel = str(Path(ev.rest).relative_to(run_dir))
            if rel.startswith("report/"):
                continue
            if rel.endswith((".parquet", ".npz")) or rel.endswith("/manifest.json"):
                renamed[rel] += 1
            if rel.endswith("/manifest.json"):
                finished.add(str(Path(ev.rest).parent))
        elif ev.kind == "ckpt":
            d, n = ev.rest.rsplit(" ", 1)
            last_ckpt[d] = max(last_ckpt[d], int(n))
        elif ev.kind == "step":
            d, n = ev.rest.rsplit(" ", 1)
            if d in finished or int(n) <= last_ckpt[d]:
                out.steps_redone_before_checkpoint.append(ev.rest)
    out.files = {k: v for k, v in renamed.items() if v > 1}
    steps: dict[str, list[int]] = defaultdict(list)
    for ev in events:
        if ev.kind == "step":
            d, n = ev.rest.rsplit(" ", 1)
            steps[d].append(int(n))
    for d, ns in steps.items():
        seen: set[int] = set()
        for n in ns:
            if n in seen:
                out.steps_after_checkpoint.append(f"{d} {n}")
            seen.add(n)
    return out


@dataclass
class ChainResult:
    kills: int = 0
    restarts: int = 0
    missed: list[str] = field(default_factory=list)  # kill points the run never reached
    kill_stages: dict[str, int] = field(default_factory=dict)


def kill_chain(cfg: Path, run_dir: Path, labels: list[str], log: Path) -> ChainResult:
    """Run with each kill point in turn (one process each), then once more to the end."""
    res = ChainResult()
    stages: dict[str, int] = defaultdict(int)
    for label in labels:
        code, out = run(cfg, run_dir, fault=fault_spec(label), log=log)
        res.restarts += 1
        if code == -signal.SIGKILL:
            res.kills += 1
            stages[stage_of(label.split(" ", 1)[1], run_dir)] += 1
        elif code == 0:
            res.missed.append(label)
        else:
            raise AssertionError(f"kill point {label}: exit {code}\n{out[-3000:]}")
    code, out = run(cfg, run_dir, log=log)
    assert code == 0, out[-3000:]
    res.kill_stages = dict(stages)
    return res


def random_kills(cfg: Path, run_dir: Path, seed: int, horizon: float, log: Path, n: int):
    """``n`` seeded random-time SIGKILLs, then a clean run to the end.

    Each process is killed a seeded random delay in [0, horizon] after its first durable
    write (Python and torch start-up take seconds on a loaded machine; a kill during
    imports tests nothing). Each restart resumes, so the kills walk through the stages.

    Returns where each kill landed: the stage of the process's last event before it.
    """
    rng = random.Random(seed)
    landed = []
    for _ in range(n):
        delay = rng.uniform(0.0, horizon)
        before = len(read_events(log)) if log.exists() else 0
        p = start(cfg, run_dir, log=log)
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(read_events(log)) > before:
                break
            time.sleep(0.05)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        if p.returncode == -signal.SIGKILL:
            evs = read_events(log)[before:] if log.exists() else []
            last = stage_of(evs[-1].rest, run_dir) if evs else "startup"
            landed.append(f"{last} (+{delay:.1f}s)")
        elif p.returncode == 0:
            break
        else:
            raise AssertionError(f"random kill run: exit {p.returncode}\n{p.stdout.read()}")
        time.sleep(0.05)
    code, out = run(cfg, run_dir, log=log)
    assert code == 0, out[-3000:]
    return landed
