"""Capture under torchrun with 2 CPU processes (gloo): same shards as one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import yaml

from fuselm.capture import capture_manifest, capture_shards, read_shard
from fuselm.cli import main
from fuselm.testing import FIXTURE_TEXTS, build_tokenizer, save_tiny_model


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fuselm",
        "-q",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_write_the_same_capture_as_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(FIXTURE_TEXTS):
        (data / f"doc{i}.txt").write_text(text * 3, encoding="utf-8")
    models = tmp_path / "models"
    cfg = {
        "corpus": {
            "inputs": [{"path": str(data)}],
            "block_tokens": 40,
            "validation_fraction": 0.25,
            "blocks_per_shard": 5,
        },
        "target": {
            "model": str(save_tiny_model(models / "bpe", build_tokenizer("bpe"))),
            "name": "tgt",
        },
        "sources": [
            {
                "model": str(save_tiny_model(models / "spm", build_tokenizer("spm"), arch="gpt2")),
                "name": "spm",
            }
        ],
        "capture": {"blocks_per_shard": 3, "batch_tokens": 120},
    }
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["-q", "prepare", "-c", str(cfg_path), "-o", str(one)]) == 0
    shutil.copytree(one, two)
    assert main(["-q", "capture", "-c", str(cfg_path), "-o", str(one)]) == 0

    started = time.perf_counter()
    res = _torchrun(["capture", "-c", str(cfg_path), "-o", str(two)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # each rank logs the shards it wrote: both ranks did work
    assert "[rank 0/2]" in res.stderr and "[rank 1/2]" in res.stderr
    print(f"torchrun capture: {time.perf_counter() - started:.1f} s")

    for name in ("tgt", "spm"):
        a, b = capture_shards(one, name), capture_shards(two, name)
        assert [p.name for p in a] == [p.name for p in b] and len(a) > 4
        for pa, pb in zip(a, b, strict=True):
            for x, y in zip(read_shard(pa), read_shard(pb), strict=True):
                assert x.hash == y.hash
                for field in ("token_ids", "offsets", "ids", "logprobs", "gold", "tail_logmass"):
                    assert np.array_equal(getattr(x, field), getattr(y, field)), field
        assert capture_manifest(one, name)["stats"] == capture_manifest(two, name)["stats"]

    # a rerun after losing shards redoes only those, split over both ranks again
    lost = capture_shards(two, "spm")[1:3]
    kept = {p: p.stat().st_mtime_ns for p in capture_shards(two, "spm") if p not in lost}
    for p in lost:
        p.unlink()
    res = _torchrun(["capture", "-c", str(cfg_path), "-o", str(two)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(p.exists() for p in lost)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert capture_manifest(one, "spm")["stats"] == capture_manifest(two, "spm")["stats"]
