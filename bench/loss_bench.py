"""Time and peak memory of the sparse fusion loss vs a dense-teacher implementation.

Usage::

    python bench/loss_bench.py [--batch 2 --length 512 --vocab 49152 --k 10 --reps 5]
                               [--device cpu|cuda] [--threads N]

Every variant runs forward + backward (gradient w.r.t. the logits) on the same random
inputs. Figures are printed, never asserted.

- Time: all variants in one process, round-robin over ``--reps`` rounds after one warm-up
  round, and the *minimum* per variant is reported (robust to other load on the machine).
- Peak memory: each variant in a fresh subprocess, one step, measured above the inputs
  (logits, teacher, labels) already being resident. CPU: the kernel's peak-RSS mark
  (``VmHWM``, reset after the inputs are built) with a fixed glibc mmap threshold so that
  RSS follows the live tensors; CUDA: ``torch.cuda.max_memory_allocated``. The (B, T, V)
  gradient of the logits, which every variant must produce, is included.

Variants:
- ``sparse``: :func:`fuselm.train.losses.fusion_loss` (gather at the top-k ids, analytic
  chunked backward).
- ``sparse_combined``: :func:`fuselm.train.losses.combined_loss` (CLM + fusion, lam=0.9).
- ``dense``: the research code's approach: scatter the teacher into a dense (B, T, V)
  tensor and take ``-(q * log_softmax(z)).sum(-1)`` under autograd.
- ``torch_ce``: plain CLM with ``F.cross_entropy`` for scale (what a CLM-only step's loss
  costs in a stock Hugging Face model).

The last line is ``sparse_vs_dense_time=<x> sparse_vs_dense_mem=<x>`` (ratios; < 1 means
the sparse loss is cheaper).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from common import peak_memory_per_variant

from fuselm.train.losses import combined_loss, fusion_loss

VARIANTS = ("sparse", "sparse_combined", "dense", "torch_ce")


def dense_fusion_loss(logits, ids, logprobs, labels):
    """Dense-teacher reference: builds the (B, T, V) teacher the sparse loss avoids."""
    q_k = torch.where(ids >= 0, logprobs, float("-inf")).softmax(-1)  # (B, T, K)
    q = torch.zeros_like(logits).scatter_add_(-1, ids.clamp_min(0), q_k)  # (B, T, V)
    per_pos = -(q * logits.log_softmax(-1)).sum(-1)  # (B, T)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return per_pos[mask].mean()


def make_inputs(b, t, v, k, device):
    """Random logits (requiring grad), distinct teacher ids, teacher log-probs, labels."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(b, t, v, generator=g).to(device).requires_grad_()
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    logprobs = torch.randn(b, t, k, generator=g).log_softmax(-1) - 0.2
    labels = torch.randint(0, v, (b, t), generator=g)
    return logits, ids.to(device), logprobs.to(device), labels.to(device)


def make_step(variant, logits, ids, logprobs, labels):
    """A closure running forward + backward of one variant; returns (loss, grad)."""

    def step():
        if variant == "sparse":
            loss, _ = fusion_loss(logits, ids, logprobs, labels)
        elif variant == "sparse_combined":
            loss, _ = combined_loss(logits, labels, ids, logprobs, lam=0.9)
        elif variant == "dense":
            loss = dense_fusion_loss(logits, ids, logprobs, labels)
        else:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        (grad,) = torch.autograd.grad(loss, logits)
        if logits.is_cuda:
            torch.cuda.synchronize()
        return float(loss.detach()), grad

    return step


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that setup transients do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(variant, args) -> int:
    """Peak bytes above the inputs for one step of one variant (run in a fresh process)."""
    device = torch.device(args.device)
    inputs = make_inputs(args.batch, args.length, args.vocab, args.k, device)
    step = make_step(variant, *inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - base
    # Input generation has transients (torch.randn peaks at ~2x its output); without a
    # reset they would set the high-water mark for the cheaper variants.
    if not reset_peak_rss():
        print("warning: cannot reset peak RSS; cheap variants are overstated", file=sys.stderr)
    base = rss_bytes()
    step()
    return peak_rss_bytes() - base


def measure_time(args) -> tuple[dict[str, float], dict[str, float]]:
    """Minimum step time per variant over round-robin rounds, and each variant's loss."""
    device = torch.device(args.device)
    inputs = make_inputs(args.batch, args.length, args.vocab, args.k, device)
    steps = {v: make_step(v, *inputs) for v in VARIANTS}
    best = {v: float("inf") for v in VARIANTS}
    losses = {}
    for rnd in range(args.reps + 1):  # round 0 warms up and is not timed
        for v in VARIANTS:
            t0 = time.perf_counter()
            losses[v], grad = steps[v]()
            elapsed = time.perf_counter() - t0
            del grad
            if rnd > 0:
                best[v] = min(best[v], elapsed)
    return best, losses


def main() -> None:
    """Parse arguments, measure every variant, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # subprocess mode
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_bytes": measure_memory(args.memory_of, args)}))
        return

    bvt_bytes = args.batch * args.length * args.vocab * 4
    print(
        f"B={args.batch} T={args.length} V={args.vocab} K={args.k} device={args.device} "
        f"threads={torch.get_num_threads()} reps={args.reps}; one (B,T,V) float32 tensor = "
        f"{bvt_bytes / 2**20:.0f} MiB"
    )
    peak = peak_memory_per_variant(__file__, sys.argv[1:], VARIANTS)
    best, losses = measure_time(args)
    for v in VARIANTS:
        print(
            f"{v:>15}: time {best[v] * 1000:8.1f} ms  peak above inputs "
            f"{peak[v] / 2**20:6.0f} MiB ({peak[v] / bvt_bytes:.2f} x BTV)  loss {losses[v]:.4f}"
        )
    same = abs(losses["sparse"] - losses["dense"]) < 1e-4 * abs(losses["dense"])
    print(f"sparse loss == dense loss: {same}")
    print(
        f"combined_vs_torch_ce_time={best['sparse_combined'] / best['torch_ce']:.3f} "
        f"combined_vs_torch_ce_mem={peak['sparse_combined'] / peak['torch_ce']:.3f}"
    )
    print(
        f"sparse_vs_dense_time={best['sparse'] / best['dense']:.3f} "
        f"sparse_vs_dense_mem={peak['sparse'] / peak['dense']:.3f}"
    )


if __name__ == "__main__":
    main()
