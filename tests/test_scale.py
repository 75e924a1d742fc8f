"""Beyond one machine: streaming readers, streaming training data, online teachers, 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fuselm.cli import main
from fuselm.config import CorpusInput, load_config
from fuselm.documents import iter_documents
from fuselm.testing import FIXTURE_TEXTS
from fuselm.train.trainer import STOP_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TRAIN = {
    "max_steps": 4,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "seq_len": 32,
    "precision": "float32",
    "shuffle_shards": 2,
}


@pytest.fixture(scope="module")
def aligned(tiny_models, tmp_path_factory):
    """prepare + capture + align done, with many small shards; (config path, run dir)."""
    root = tmp_path_factory.mktemp("scale")
    data = root / "data"
    data.mkdir()
    for i, text in enumerate(FIXTURE_TEXTS):
        (data / f"doc{i}.txt").write_text(text * 2, encoding="utf-8")
    cfg = {
        "corpus": {
            "inputs": [{"path": str(data)}],
            "block_tokens": 40,
            "validation_fraction": 0.2,
            "blocks_per_shard": 4,
        },
        "target": {"model": str(tiny_models["bpe"]), "name": "tgt"},
        "sources": [{"model": str(tiny_models["spm"]), "name": "spm"}],
        "capture": {"blocks_per_shard": 3},
        "train": TRAIN,
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run = root / "aligned"
    for stage in ("prepare", "capture", "align"):
        assert main(["-q", stage, "-c", str(path), "-o", str(run)]) == 0
    return path, run


def fresh(aligned, tmp_path, name="run"):
    cfg, src = aligned
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return cfg, dst


def stats(run, variant="fused"):
    return json.loads((run / "train" / variant / "manifest.json").read_text())["stats"]


def log_lines(run, variant="fused"):
    text = (run / "train" / variant / "log.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def weights(run, variant="fused"):
    return load_file(str(run / "train" / variant / "model" / "model.safetensors"))


# --------------------------------------------------------------------------- readers


def test_jsonl_and_parquet_are_read_without_loading_the_file(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": f"doc {i} " * 5}) for i in range(50)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(
        pa.table({"text": [f"row {i}" for i in range(3000)]}),
        tmp_path / "b.parquet",
        row_group_size=500,
    )

    def whole(*a, **k):
        raise AssertionError("a whole corpus file was loaded")

    monkeypatch.setattr(Path, "read_bytes", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    counters: dict[str, int] = {}
    docs = iter_documents(CorpusInput(path=str(tmp_path / "a.jsonl")), 0, "strict", counters)
    assert next(docs).text == "doc 0 " * 5  # a generator: the first document comes first
    assert sum(1 for _ in docs) == 49
    docs = list(iter_documents(CorpusInput(path=str(tmp_path / "b.parquet")), 0, "strict", {}))
    assert len(docs) == 3000 and docs[-1].text == "row 2999"


def test_jsonl_errors_still_name_line_and_byte_offset(tmp_path):
    from fuselm.documents import CorpusError

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl: not valid UTF-8 at byte offset 28"):
        list(iter_documents(CorpusInput(path=str(path)), 0, "strict", {}))
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(CorpusInput(path=str(path)), 0, "strict", {}))


def test_hf_streaming_dataset_from_local_parquet_glob(tmp_path, tiny_models, write_config):
    """`hf_dataset: parquet` + a glob of shards: an IterableDataset, same blocks as `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        texts = [FIXTURE_TEXTS[(s + i) % len(FIXTURE_TEXTS)] for i in range(4)]
        pq.write_table(pa.table({"text": texts, "domain": [f"d{s}"] * 4}), shards / f"{s}.parquet")
    base = {
        "corpus": {"block_tokens": 40, "validation_fraction": 0.0},
        "target": {"model": str(tiny_models["bpe"]), "name": "tgt"},
    }
    hf = {
        **base,
        "corpus": {
            **base["corpus"],
            "inputs": [{"hf_dataset": "parquet", "hf_data_files": ["shards/*.parquet"]}],
        },
    }
    local = {
        **base,
        "corpus": {**base["corpus"], "inputs": [{"path": str(shards), "glob": "*.parquet"}]},
    }
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["-q", "prepare", "-c", str(write_config(hf, "hf.yaml")), "-o", str(a)]) == 0
    assert main(["-q", "prepare", "-c", str(write_config(local, "l.yaml")), "-o", str(b)]) == 0
    from fuselm.corpus import read_blocks

    ta, tb = read_blocks(a).to_pylist(), read_blocks(b).to_pylist()
    assert sorted(r["text"] for r in ta) == sorted(r["text"] for r in tb) and len(ta) >= 12
    assert {r["domain"] for r in ta} == {"d0", "d1", "d2"}
    # the identity covers the files' contents: an edited shard makes prepare stale
    pq.write_table(pa.table({"text": ["changed"], "domain": ["d0"]}), shards / "0.parquet")
    assert main(["-q", "prepare", "-c", str(tmp_path / "hf.yaml"), "-o", str(a)]) == 1


def test_overlapping_inputs_are_refused(tmp_path, tiny_models, write_config):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hello world\n", encoding="utf-8")
    cfg = {
        "corpus": {"inputs": [{"path": str(tmp_path / "d")}, {"path": str(tmp_path / "d/x.txt")}]},
        "target": {"model": str(tiny_models["bpe"])},
    }
    from fuselm.corpus import CorpusError, run_prepare

    with pytest.raises(CorpusError, match=r"x\.txt: read by corpus\.inputs\[0\] and .*\[1\]"):
        run_prepare(load_config(write_config(cfg)), tmp_path / "run")


# --------------------------------------------------------------------------- streaming rows


def store_iter(run, name):
    from fuselm.align.store import iter_aligned

    return (b for b in iter_aligned(run, name, "train") if b.n_positions > 0)


def _memory_rows(run, names, spec, seq_len):
    from fuselm.align.store import load_aligned
    from fuselm.train.data import build_examples, join_sources

    joined = join_sources({n: load_aligned(run, n, "train") for n in names}, split="train")
    return build_examples(joined, names, spec, seq_len)


def test_streaming_rows_equal_in_memory_rows(aligned):
    from fuselm.train.data import FusionSpec
    from fuselm.train.stream import AlignedShards, StreamingExamples

    _, run = aligned
    names, spec = ["tgt", "spm"], FusionSpec()
    mem = _memory_rows(run, names, spec, 32)
    reader = AlignedShards(run, names, "train", cache=2)
    assert len(reader.names) >= 6  # many small shards, so the cache bound below matters
    stream = StreamingExamples(reader, names, spec, 32, group_shards=2)
    # The in-memory path joins by hash, so a text that occurs twice is one block there;
    # streaming keeps the corpus as it is (duplicates included). The fixture has some.
    n_blocks = sum(1 for _ in store_iter(run, "tgt"))
    assert stream.blocks == n_blocks > mem.blocks
    got = {(e.hash, e.part): e for e in stream.fetch(range(len(stream)))}
    assert len(reader._tables) <= 2  # never more than `cache` shards decoded at once
    assert set(got) == {(e.hash, e.part) for e in mem.examples}
    for e in mem.examples:
        s = got[(e.hash, e.part)]
        assert np.array_equal(s.input_ids, e.input_ids)
        assert np.array_equal(s.teacher_ids, e.teacher_ids)
        assert np.array_equal(s.teacher_logprobs, e.teacher_logprobs)
    assert stream.fusion.blocks == n_blocks  # every block fused and counted once

    # one step per row, one row per step: the first epoch is a permutation of all rows
    plan = stream.plan(steps=len(stream), micro_batch=1, grad_accum=1, seed=3)
    flat = [plan[i][0][0] for i in range(len(stream))]
    assert sorted(flat) == list(range(len(stream)))
    again = stream.plan(steps=len(stream), micro_batch=1, grad_accum=1, seed=3)
    assert [again[i] for i in reversed(range(len(stream)))][::-1] == [
        plan[i] for i in range(len(stream))
    ]


def test_streaming_train_never_loads_all_alignments(aligned, tmp_path, monkeypatch):
    import fuselm.align.store as store

    def whole(*a, **k):
        raise AssertionError("load_aligned reads a whole alignment into memory")

    monkeypatch.setattr(store, "load_aligned", whole)
    cfg, run = fresh(aligned, tmp_path)
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run), "train.streaming=true"]) == 0
    st = stats(run)
    assert st["streaming"] and st["steps"] == 4 and st["processes"] == 1
    assert sum(st["fusion"]["selection_share"].values()) == pytest.approx(1, abs=1e-5)
    assert [x["rows"] for x in log_lines(run)] == [x["rows"] for x in log_lines(run, "control")]
    assert all(np.isfinite(x["fusion"]) for x in log_lines(run))


# --------------------------------------------------------------------------- online teachers


def test_online_fused_targets_equal_offline_for_a_fixed_batch(aligned):
    from fuselm.train.data import FusionSpec, build_examples, join_sources
    from fuselm.train.online import OnlineTeachers
    from fuselm.train.stream import AlignedShards

    cfg_path, run = aligned
    cfg = load_config(cfg_path)
    names = ["tgt", "spm"]
    online, offline = OnlineTeachers(cfg, run, "train"), AlignedShards(run, names, "train")
    assert online.names == offline.names  # same shards, so the same streaming order
    for shard in online.names[:3]:
        a_len, a_hash = online.block_lengths(shard)
        b_len, b_hash = offline.block_lengths(shard)
        assert np.array_equal(a_len, b_len) and a_hash == b_hash
        rows = list(range(len(a_hash)))
        on, off = online.blocks(shard, rows), offline.blocks(shard, rows)
        for x, y in zip(on, off, strict=True):
            for n in names:
                for f in ("input_ids", "ids", "logprobs", "valid", "gold", "next_bytes"):
                    assert np.array_equal(getattr(x[n], f), getattr(y[n], f)), (n, f)
                assert x[n].nll_sum == y[n].nll_sum and x[n].nll_bytes == y[n].nll_bytes
        for fn in ("min_ce", "avg_ce"):
            spec = FusionSpec(function=fn)
            fa = build_examples(
                join_sources({n: {b[n].hash: b[n] for b in on} for n in names}, None),
                names,
                spec,
                32,
            )
            fb = build_examples(
                join_sources({n: {b[n].hash: b[n] for b in off} for n in names}, None),
                names,
                spec,
                32,
            )
            assert len(fa.examples) == len(fb.examples) > 0
            for ea, eb in zip(fa.examples, fb.examples, strict=True):
                assert np.array_equal(ea.teacher_ids, eb.teacher_ids)
                assert np.array_equal(ea.teacher_logprobs, eb.teacher_logprobs)
    assert online.forward_tokens > 0


def test_online_training_writes_no_teacher_data_and_matches_offline(aligned, tmp_path):
    cfg, off = fresh(aligned, tmp_path, "offline")
    on = tmp_path / "online"
    assert main(["-q", "prepare", "-c", str(cfg), "-o", str(on)]) == 0
    over = ["eval.control=false"]
    assert main(["-q", "train", "-c", str(cfg), "-o", str(off), "train.streaming=true", *over]) == 0
    online = ["capture.mode=online", *over]
    for stage in ("capture", "align", "train"):
        assert main(["-q", stage, "-c", str(cfg), "-o", str(on), *online]) == 0
    assert not (on / "capture").exists()
    assert not list((on / "align").glob("*/*.parquet"))  # only the vocabulary-map cache
    assert stats(on)["mode"] == "online" and stats(on)["teacher_tokens_this_process"] > 0
    la, lb = log_lines(off), log_lines(on)
    assert [x["rows"] for x in la] == [x["rows"] for x in lb]
    for a, b in zip(la, lb, strict=True):
        assert a["clm"] == pytest.approx(b["clm"], rel=1e-6)
        assert a["fusion"] == pytest.approx(b["fusion"], rel=1e-6)
    wa, wb = weights(off), weights(on)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- two processes


def _torchrun(args, extra_env=None, quiet=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", STOP_ENV):
        env.pop(var, None)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "fuselm", *(["-q"] if quiet else []), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_streaming_train_resumes_per_rank_and_equals_one_process(aligned, tmp_path):
    """2 CPU ranks (gloo), streaming, killed after step 2 and resumed == 1 process."""
    cfg, one = fresh(aligned, tmp_path, "one")
    _, two = fresh(aligned, tmp_path, "two")
    over = ["eval.control=false", "train.streaming=true", "train.save_steps=1"]
    assert main(["-q", "train", "-c", str(cfg), "-o", str(one), *over]) == 0
    args = ["train", "-c", str(cfg), "-o", str(two), *over, "train.batch_size=1"]
    res = _torchrun(args, {STOP_ENV: "2"})
    assert res.returncode != 0 and "stopped after step 2" in res.stderr
    ckpt = two / "train" / "fused" / "checkpoints" / "step-0000002"
    assert (ckpt / "trainer_state.json").exists()
    res = _torchrun(args)
    assert res.returncode == 0, res.stderr[-3000:]
    s1, s2 = stats(one), stats(two)
    assert s2["processes"] == 2 and s2["resumed_from"] == 2
    assert s2["global_batch"] == s1["global_batch"] == 2 and s2["steps"] == s1["steps"]
    l1, l2 = log_lines(one), log_lines(two)
    assert [x["rows"] for x in l1] == [x["rows"] for x in l2]
    for a, b in zip(l1, l2, strict=True):
        assert a["clm"] == pytest.approx(b["clm"], rel=1e-4)
        assert a["fusion"] == pytest.approx(b["fusion"], rel=1e-4)
    w1, w2 = weights(one), weights(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=5e-5)


@pytest.mark.slow  # one more torchrun (~1 min on the shared 2 cores)
def test_torchrun_online_teachers_split_across_ranks(aligned, tmp_path):
    """Online mode under 2 ranks: each runs the teachers on its own rows; same run as 1."""
    cfg, _ = aligned
    one, two = tmp_path / "one", tmp_path / "two"
    over = ["eval.control=false", "capture.mode=online", "train.max_steps=2"]
    assert main(["-q", "prepare", "-c", str(cfg), "-o", str(one)]) == 0
    shutil.copytree(one, two)
    assert main(["-q", "train", "-c", str(cfg), "-o", str(one), *over]) == 0
    res = _torchrun(["train", "-c", str(cfg), "-o", str(two), *over, "train.batch_size=1"])
    assert res.returncode == 0, res.stderr[-3000:]
    s1, s2 = stats(one), stats(two)
    assert s2["processes"] == 2 and s2["mode"] == "online"
    # rank 0 ran the teachers on its half of the rows only
    assert 0 < s2["teacher_tokens_this_process"] < s1["teacher_tokens_this_process"]
    l1, l2 = log_lines(one), log_lines(two)
    assert [x["rows"] for x in l1] == [x["rows"] for x in l2]
    for a, b in zip(l1, l2, strict=True):
        assert a["fusion"] == pytest.approx(b["fusion"], rel=1e-4)
    assert not (two / "capture").exists()


@pytest.mark.slow  # one more torchrun (~1 min on the shared 2 cores)
def test_torchrun_align_splits_shards_and_equals_one_process(aligned, tmp_path):
    from fuselm.align.store import aligned_shards, iter_shard

    cfg, one = aligned
    two = tmp_path / "two"
    shutil.copytree(one, two)
    shutil.rmtree(two / "align")
    res = _torchrun(["align", "-c", str(cfg), "-o", str(two)], quiet=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0/2]" in res.stderr and "[rank 1/2]" in res.stderr
    for name in ("tgt", "spm"):
        a, b = aligned_shards(one, name), aligned_shards(two, name)
        assert [p.name for p in a] == [p.name for p in b] and len(a) >= 6
        for pa, pb in zip(a, b, strict=True):
            for x, y in zip(iter_shard(pa), iter_shard(pb), strict=True):
                assert x.hash == y.hash
                for f in ("input_ids", "ids", "logprobs", "valid", "gold", "next_bytes"):
                    assert np.array_equal(getattr(x, f), getattr(y, f)), f
        sa = json.loads((one / "align" / name / "manifest.json").read_text())["stats"]
        sb = json.loads((two / "align" / name / "manifest.json").read_text())["stats"]
        for key in ("blocks", "positions", "coverage", "bytes"):
            if key in sa:
                assert sa[key] == sb[key], key
