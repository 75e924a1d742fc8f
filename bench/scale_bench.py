"""Peak memory and throughput of every stage as the corpus grows (1x, 4x, 16x).

Usage::

    python bench/scale_bench.py [--docs 60] [--sizes 1,4,16] [--workdir DIR]

The same pipeline (tiny models built here: a byte-level-BPE Llama target that is also
source #0 and a SentencePiece-style GPT-2 source, as in the tests) runs on a corpus of
``docs x size`` documents of Python standard-library source (~2 KB each, Parquet shards
read through ``hf_dataset: parquet`` + ``hf_data_files``, i.e. a streaming
``IterableDataset``). Every stage runs in a fresh process (``python -m fuselm STAGE``
semantics, via ``fuselm.cli.main``) and reports its peak resident memory
(``ru_maxrss``) and wall time; figures are printed, never asserted.

Stages measured: prepare, capture, align, train (``train.streaming: true``), eval, and as
the baseline measured in the same run, train with the in-memory data path
(``train.streaming: false``: every block fused up front), which is what streaming avoids.

Tiny models make the model work negligible, so the memory figures show what the *data
path* holds (anything that grows with the corpus shows up), and the throughput figures
show the per-token overhead of each stage's CPU side (tokenization, top-k encoding,
alignment, fusion, batching) on this machine; docs/scaling.md uses them.

The machine is shared (2 cores, other jobs running): wall times vary from run to run; the
tokens/s per stage are reported per size and as the median over sizes.

Last line: ``rss_growth_16x=<ratio>``: the largest ratio of a streaming stage's peak RSS at
the largest size to its peak at 1x (target: at most 1.1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

STAGES = ("prepare", "capture", "align", "train", "eval")
BASELINE = "train_in_memory"


def _docs(n: int, chars: int = 2000) -> list[str]:
    """``n`` documents of ~``chars`` characters cut from the standard library's source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for start in range(0, len(text) - chars // 2, chars):
            out.append(text[start : start + chars])
            if len(out) >= n:
                return out
    raise SystemExit(f"only {len(out)} documents of standard-library source found")


def _write_corpus(folder: Path, docs: list[str], per_shard: int = 50) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(docs), per_shard):
        part = docs[i : i + per_shard]
        domain = ["code" if j % 3 else "other" for j in range(i, i + len(part))]
        pq.write_table(pa.table({"text": part, "domain": domain}), folder / f"{i:07d}.parquet")


def _models(folder: Path) -> dict[str, str]:
    from fuselm.testing import build_tokenizer, save_tiny_model

    if not (folder / "spm" / "config.json").exists():
        save_tiny_model(folder / "bpe", build_tokenizer("bpe"), max_positions=256)
        save_tiny_model(folder / "spm", build_tokenizer("spm"), arch="gpt2", max_positions=256)
    return {"bpe": str(folder / "bpe"), "spm": str(folder / "spm")}


def _config(corpus: Path, models: dict[str, str], path: Path) -> Path:
    import yaml

    cfg = {
        "corpus": {
            "inputs": [{"hf_dataset": "parquet", "hf_data_files": [str(corpus / "*.parquet")]}],
            "block_tokens": 128,
            "validation_fraction": 0.1,
            "blocks_per_shard": 100,
        },
        "target": {"model": models["bpe"], "name": "tgt"},
        "sources": [{"model": models["spm"], "name": "spm"}],
        "capture": {"blocks_per_shard": 50, "batch_tokens": 8192},
        "train": {
            "seq_len": 128,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "precision": "float32",
            "streaming": True,
            "shuffle_shards": 2,
        },
        "eval": {"control": False},
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- child


def _child(stage: str, config: str, run_dir: str) -> None:
    """Run one stage in this (fresh) process; print its peak RSS and wall time as JSON."""
    import torch

    torch.set_num_threads(1)
    from fuselm.cli import main

    args = ["-q", stage, "-c", config, "-o", run_dir]
    if stage == BASELINE:
        args = ["-q", "train", "-c", config, "-o", run_dir, "train.streaming=false", "--force"]
    t0 = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"stage {stage} failed with exit code {code}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def _run_child(stage: str, config: Path, run_dir: Path) -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        # Large blocks are mapped and unmapped, so RSS follows live data (bench/common.py).
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    cmd = [sys.executable, __file__, "--child", stage, str(config), str(run_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _tokens(run_dir: Path, stage: str) -> int:
    """Tokens the stage processed (from the manifests), for tokens/s."""

    def man(rel: str) -> dict:
        return json.loads((run_dir / rel / "manifest.json").read_text())

    if stage == "prepare":
        return int(sum(man("prepare")["stats"]["tokens"].values()))
    if stage == "capture":
        return sum(int(man(f"capture/{n}")["stats"]["tokens"]) for n in ("tgt", "spm"))
    if stage == "align":
        return sum(int(man(f"align/{n}")["stats"]["positions"]) for n in ("tgt", "spm"))
    if stage in ("train", BASELINE):
        return int(man("train/fused")["stats"]["data_tokens"])
    if stage == "eval":
        res = json.loads((run_dir / "eval" / "results.json").read_text())
        return sum(int(m["overall"]["tokens"]) for m in res["models"].values())
    raise ValueError(stage)


# --------------------------------------------------------------------------- data path


def data_path_rates(run_dir: Path, reps: int = 3) -> tuple[float, float]:
    """Positions/s (1 thread) of train's data path on a finished run's alignment.

    Streaming: count the rows, then fetch (decode, join, fuse) and collate every row in
    micro-batches of 8, as the training loop does. Baseline: the in-memory path
    (``load_aligned`` + ``join_sources`` + ``build_examples``, collate excluded). Best of
    ``reps`` (the machine is shared).
    """
    import torch

    from fuselm.align.store import load_aligned
    from fuselm.train.batching import collate
    from fuselm.train.data import FusionSpec, build_examples, join_sources
    from fuselm.train.stream import AlignedShards, StreamingExamples

    torch.set_num_threads(1)
    names = ["tgt", "spm"]
    best_s = best_m = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        src = StreamingExamples(AlignedShards(run_dir, names, cache=4), names, FusionSpec(), 128, 2)
        positions = 0
        for i in range(0, len(src), 8):
            positions += int(collate(src.fetch(range(i, min(i + 8, len(src)))))["clm_tokens"])
        best_s = max(best_s, positions / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        joined = join_sources({n: load_aligned(run_dir, n, "train") for n in names})
        data = build_examples(joined, names, FusionSpec(), 128)
        pos = sum(len(e) - 1 for e in data.examples)
        best_m = max(best_m, pos / (time.perf_counter() - t0))
    return best_s, best_m


# --------------------------------------------------------------------------- main


def main() -> None:
    """Run the pipeline at every size and print memory and throughput per stage."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=12, help="documents at 1x (~2 KB each)")
    p.add_argument("--sizes", default="1,4,16", help="corpus multiples, comma-separated")
    p.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir)")
    p.add_argument(
        "--child", nargs=3, metavar=("STAGE", "CONFIG", "RUN_DIR"), help=argparse.SUPPRESS
    )
    p.add_argument("--data-path", default="", help="only time train's data path on this run dir")
    args = p.parse_args()
    if args.child:
        _child(*args.child)
        return
    if args.data_path:
        s_rate, m_rate = data_path_rates(Path(args.data_path))
        print(
            f"train data path, positions/s on 1 thread: streaming fetch+fuse+collate "
            f"{s_rate:,.0f}; in-memory build {m_rate:,.0f}; ratio {s_rate / m_rate:.2f}"
        )
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fuselm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    models = _models(work / "models")
    all_docs = _docs(args.docs * max(sizes))
    print(f"scale bench in {work}; {args.docs} documents (~2 KB) at 1x; sizes {sizes}")
    print("machine: shared, 2 CPU cores, 1 thread per stage; times vary with the load")
    rows: dict[int, dict[str, dict]] = {}
    started = time.perf_counter()
    for size in sizes:
        corpus = work / f"corpus-{size}x"
        _write_corpus(corpus, all_docs[: args.docs * size])
        config = _config(corpus, models, work / f"run-{size}x.yaml")
        run_dir = work / f"run-{size}x"
        rows[size] = {}
        for stage in (*STAGES, BASELINE):
            r = _run_child(stage, config, run_dir)
            r["tokens"] = _tokens(run_dir, stage)
            rows[size][stage] = r
            print(
                f"  {size:>3}x {stage:<16} peak {r['peak_bytes'] / 2**20:8.1f} MiB  "
                f"{r['seconds']:7.1f} s  {r['tokens']:>9,} tokens  "
                f"{r['tokens'] / r['seconds']:>9,.0f} tok/s",
                flush=True,
            )
    base, top = sizes[0], sizes[-1]
    print(f"\npeak RSS per stage (MiB) and growth {top}x/{base}x:")
    growth = {}
    for stage in (*STAGES, BASELINE):
        peaks = [rows[s][stage]["peak_bytes"] / 2**20 for s in sizes]
        growth[stage] = peaks[-1] / peaks[0]
        label = f"{stage} (baseline: in-memory data)" if stage == BASELINE else stage
        print(
            f"  {label:<36} " + "  ".join(f"{x:8.1f}" for x in peaks) + f"   x{growth[stage]:.3f}"
        )
    print(
        "\nthroughput per stage, tokens/s: median over sizes, each size, and marginal "
        f"({top}x - {base}x: extra tokens / extra seconds, without the fixed start-up cost):"
    )
    for stage in (*STAGES, BASELINE):
        rates = [rows[s][stage]["tokens"] / rows[s][stage]["seconds"] for s in sizes]
        a, b = rows[base][stage], rows[top][stage]
        marginal = (b["tokens"] - a["tokens"]) / max(b["seconds"] - a["seconds"], 1e-9)
        print(
            f"  {stage:<16} median {statistics.median(rates):>9,.0f}   "
            + "  ".join(f"{x:,.0f}" for x in rates)
            + f"   marginal {marginal:,.0f}"
        )
    s_rate, m_rate = data_path_rates(work / f"run-{top}x")
    print(
        f"\ntrain data path at {top}x, positions/s on 1 thread (best of 3): streaming "
        f"fetch+fuse+collate {s_rate:,.0f}; in-memory build (baseline) {m_rate:,.0f}; "
        f"ratio {s_rate / m_rate:.2f}"
    )
    print(f"\nbench wall time: {time.perf_counter() - started:.0f} s")
    print(f"baseline_in_memory_train_growth_{top}x={growth[BASELINE]:.3f}")
    worst = max(growth[s] for s in STAGES)
    print(f"rss_growth_{top}x={worst:.3f}")


if __name__ == "__main__":
    main()
