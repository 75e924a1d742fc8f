"""Cost of measuring held-out bits per byte during training (``train.eval_every``).

Usage::

    python bench/heldout_bench.py [--model DIR] [--batch 1 --length 256 --steps 8]
                                  [--eval-every 200 --eval-blocks 16] [--threads N]

Both runs train the same model on the same rows through the real ``Trainer``: one with
``eval_every = 0`` (the baseline) and one measuring every ``--direct-every`` steps, in the
same process, so the measured overhead is at that (small) interval. The default interval
(``--eval-every``, the config's default) is too rare to see in a short run, so its overhead
is computed from the same two runs: the time of one measurement over ``eval_every`` times
the median step time of the baseline.

``--model``: a saved causal LM folder (``--random``: a small random Llama); default
SmolLM2-135M from ``fuselm.assets`` when its package is installed, else a random Llama
(the ratio hardly depends on the model's size: a measurement is ``eval_blocks`` forward
passes, a step ``batch`` forward+backward passes).

Last line: ``heldout_overhead_default=<ratio> heldout_overhead_direct=<ratio>`` (time with
measurements / time without, minus 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fuselm.train.data import TrainExample
from fuselm.train.heldout import HeldOut, HeldOutBlock
from fuselm.train.step import TrainSettings
from fuselm.train.trainer import LOG_FILE, Trainer


def load_model(path: str | None, random: bool = False):
    """The model to train, and where it came from."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if path is None and not random:
        try:
            from fuselm import assets

            path = str(assets.smollm2_dir())
        except Exception:  # no package index / not installed: a random model instead
            path = None
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), path
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg), "random Llama (4 x 256, vocab 8192)"


def step_times(out: Path) -> list[float]:
    """Seconds of every optimiser step from the trainer's log (``time`` is cumulative)."""
    lines = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
    times = [x["time"] for x in lines if "clm" in x]
    return [b - a for a, b in zip([0.0, *times[:-1]], times, strict=True)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--random", action="store_true", help="a small random Llama (fast check)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--direct-every", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, origin = load_model(args.model, args.random)
    vocab = model.get_input_embeddings().weight.shape[0]
    rng = np.random.default_rng(0)
    rows = [
        TrainExample(f"h{i}", f"d#{i}", 0, rng.integers(0, vocab, args.length))
        for i in range(args.batch * args.steps)
    ]
    blocks = [
        HeldOutBlock(f"v{i}", "ab"[i % 2], rng.integers(0, vocab, args.length), 4 * args.length)
        for i in range(args.eval_blocks)
    ]
    base = dict(
        lam=1.0, learning_rate=1e-5, warmup_ratio=0.0, max_steps=args.steps,
        batch_size=args.batch, precision="float32", seed=0,
    )  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, every in (("off", 0), ("direct", args.direct_every)):
            out = Path(tmp) / name
            t0 = time.perf_counter()
            Trainer(
                lambda d: copy.deepcopy(model).to(d),
                rows,
                TrainSettings(**base, eval_every=every),
                out,
                fingerprint=name,
                heldout=HeldOut(blocks) if every else None,
            ).train()
            results[name] = {"wall": time.perf_counter() - t0, "steps": step_times(out)}
    step = statistics.median(results["off"]["steps"])
    # Measurements inside the timed steps (the one before step 1 is outside t0's clock).
    inside = args.steps // args.direct_every
    extra = sum(results["direct"]["steps"]) - sum(results["off"]["steps"])
    per_measure = max(extra, 0.0) / max(inside, 1)
    direct = per_measure / (args.direct_every * step)
    default = per_measure / (args.eval_every * step)
    print(f"model: {origin}; batch {args.batch} x {args.length} tokens; {args.steps} steps")
    print(
        f"median step {step:.3f} s; one measurement of {args.eval_blocks} blocks "
        f"{per_measure:.3f} s"
    )
    print(
        f"overhead every {args.direct_every} steps: {direct:.1%}; at the default "
        f"eval_every={args.eval_every}: {default:.2%}"
    )
    print(f"heldout_overhead_default={default:.4f} heldout_overhead_direct={direct:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
