"""Cost of the fusion term in a whole training step: time and peak memory vs CLM-only.

Usage::

    python bench/train_bench.py [--batch 2 --length 256 --vocab 49152 --hidden 256
                                 --layers 4 --k 10 --sources 3 --reps 5]
                                [--device cpu|cuda] [--threads N]

One training step = forward, loss, backward, gradient clipping and an AdamW update of a
small random Llama-architecture model, through the trainer's own loss path
(:func:`fuselm.train.step.micro_batch_loss`) on the same batch. The teacher is a fused
top-k row per position as the data layer produces it (``--sources`` x ``--k`` candidates
fused with AvgCE, so the width is up to ``sources * k``; MinCE gives exactly ``k``).

Variants:

- ``clm``: the CLM-only control step (λ = 1, no teacher tensors).
- ``fused``: the FuseLLM step (λ = 0.9, sparse fusion term).
- ``hf_clm``: the model's built-in loss (``model(input_ids, labels=...)``), for scale.

Time: round-robin over ``--reps`` rounds after a warm-up round, minimum per variant.
Peak memory: each variant in a fresh process, measured above everything resident before
the step (model, AdamW state after a warm-up step, batch, teacher): CUDA
``max_memory_allocated``; CPU the kernel's peak-RSS mark (see ``bench/loss_bench.py``).

Last line: ``fusion_step_overhead=<fused/clm time> fusion_peak_mem_ratio=<fused/clm mem>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from common import peak_memory_per_variant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_bench import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

from fuselm.fuse import avg_ce  # noqa: E402
from fuselm.train.batching import collate  # noqa: E402
from fuselm.train.data import TrainExample  # noqa: E402
from fuselm.train.step import TrainSettings, build_optimizer, micro_batch_loss  # noqa: E402

VARIANTS = ("clm", "fused", "hf_clm")


def make_model(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(args.length, 128),
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(cfg).to(device)


def make_batch(args):
    """Rows of ``--length`` tokens with a fused teacher per position."""
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(args.batch):
        ids = rng.integers(0, args.vocab, args.length)
        p = args.length - 1
        s_ids = torch.randint(0, args.vocab, (args.sources, p, args.k), generator=g)
        s_lp = torch.randn(args.sources, p, args.k, generator=g).log_softmax(-1) - 0.1
        valid = torch.ones(args.sources, p, dtype=torch.bool)
        gold = -torch.rand(args.sources, p, generator=g)
        nbytes = torch.full((args.sources, p), 3)
        fused = avg_ce(s_ids, s_lp, valid, gold, nbytes)  # union of ids (dedup by the rule)
        rows.append(
            TrainExample(f"h{b}", f"b{b}", 0, ids, fused.ids.int().numpy(), fused.logprobs.numpy())
        )
    return collate(rows)


def make_step(variant, model, opt, batch):
    lam = {"clm": 1.0, "fused": 0.9, "hf_clm": 1.0}[variant]
    s = TrainSettings(lam=lam)
    n_c, n_f = float(batch["clm_tokens"]), float(batch["fusion_tokens"])
    if variant != "fused":
        batch = {k: v for k, v in batch.items() if not k.startswith("teacher")}

    def step():
        if variant == "hf_clm":
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        else:
            loss, _ = micro_batch_loss(model, batch, s, n_c, n_f)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def setup(args, variant=None):
    device = torch.device(args.device)
    model = make_model(args, device)
    model.train()
    opt = build_optimizer(model, TrainSettings(learning_rate=1e-5))
    batch = {k: v.to(device) for k, v in make_batch(args).items()}
    steps = {v: make_step(v, model, opt, batch) for v in ([variant] if variant else VARIANTS)}
    return model, steps


def measure_memory(variant, args) -> int:
    """Peak bytes of one step above what is resident before it (fresh process)."""
    _, steps = setup(args, variant)
    step = steps[variant]
    step()  # warm-up: allocates AdamW's state, which is resident in every later step
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - base
    if not reset_peak_rss():
        print("warning: cannot reset peak RSS", file=sys.stderr)
    base = rss_bytes()
    step()
    return peak_rss_bytes() - base


def measure_time(args) -> dict[str, float]:
    _, steps = setup(args)
    best = {v: float("inf") for v in VARIANTS}
    for rnd in range(args.reps + 1):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v]()
            if rnd > 0:
                best[v] = min(best[v], time.perf_counter() - t0)
    return best


def main() -> None:
    """Parse arguments, measure, print."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sources", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_bytes": measure_memory(args.memory_of, args)}))
        return
    bvt = args.batch * args.length * args.vocab * 4
    print(
        f"B={args.batch} T={args.length} V={args.vocab} hidden={args.hidden} "
        f"layers={args.layers} fused K<={args.sources * args.k} device={args.device} "
        f"threads={torch.get_num_threads()}; one (B,T,V) float32 tensor = {bvt / 2**20:.0f} MiB"
    )
    peak = peak_memory_per_variant(__file__, sys.argv[1:], VARIANTS)
    best = measure_time(args)
    for v in VARIANTS:
        print(
            f"{v:>7}: step {best[v] * 1000:8.1f} ms  peak above resident "
            f"{peak[v] / 2**20:7.1f} MiB ({peak[v] / bvt:.2f} x BTV)"
        )
    print(
        f"clm_vs_hf_clm_time={best['clm'] / best['hf_clm']:.3f} "
        f"clm_vs_hf_clm_mem={peak['clm'] / peak['hf_clm']:.3f}"
    )
    print(
        f"fusion_step_overhead={best['fused'] / best['clm']:.3f} "
        f"fusion_peak_mem_ratio={peak['fused'] / peak['clm']:.3f}"
    )


if __name__ == "__main__":
    main()
