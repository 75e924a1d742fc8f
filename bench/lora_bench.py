"""LoRA vs full fine-tuning of the target: peak memory and step time, same model, same run.

Usage::

    python bench/lora_bench.py [--model DIR | --random] [--batch 2 --length 256]
                               [--rank 16 --reps 3] [--device cpu|cuda] [--threads N]

One training step = forward, the fused loss (λ = 0.9, a fused top-k teacher per position,
through :func:`fuselm.train.step.micro_batch_loss`), backward, clipping and an AdamW update;
``full`` trains every weight, ``lora`` the adapters of ``train.lora`` (rank ``--rank``,
all linear layers but the head; :func:`fuselm.train.step.with_lora`). ``--model``: a saved
causal LM (default SmolLM2-135M from ``fuselm.assets`` when installed, else ``--random``: a
random Llama).

Peak memory: each variant in a fresh process, measured above what is resident before the
step *including the model* (so the optimizer state, gradients and activations of the step
count, which is where LoRA saves): CUDA ``max_memory_allocated``, CPU the peak-RSS mark.
Time: round-robin over ``--reps`` rounds after a warm-up round, minimum per variant.

Last line: ``lora_peak_mem_ratio=<lora/full> lora_step_time_ratio=<lora/full>``.
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

from fuselm.config import LoraConfig  # noqa: E402
from fuselm.train.batching import collate  # noqa: E402
from fuselm.train.data import TrainExample  # noqa: E402
from fuselm.train.step import (  # noqa: E402
    TrainSettings,
    build_optimizer,
    micro_batch_loss,
    with_lora,
)

VARIANTS = ("full", "lora")


def load_model(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = args.model
    if path is None and not args.random:
        try:
            from fuselm import assets

            path = str(assets.smollm2_dir())
        except Exception:
            path = None
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device), path
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg).to(device), "random Llama (4 x 256)"


def make_batch(args, vocab):
    rng = np.random.default_rng(0)
    rows = []
    for b in range(args.batch):
        ids = rng.integers(0, vocab, args.length)
        t_ids = np.stack([rng.permutation(vocab)[:10] for _ in range(args.length - 1)])
        lp = np.log(np.full((args.length - 1, 10), 0.09, np.float32))
        rows.append(TrainExample(f"h{b}", f"b{b}", 0, ids, t_ids.astype(np.int32), lp))
    return collate(rows)


def setup(args, variant):
    device = torch.device(args.device)
    model, origin = load_model(args, device)
    model.train()
    s = TrainSettings(lam=0.9, learning_rate=1e-5)
    if variant == "lora":
        lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0)
        model = with_lora(model, lora, False)
    opt = build_optimizer(model, s)
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = {k: v.to(device) if v.dim() else v for k, v in make_batch(args, vocab).items()}
    n_c, n_f = float(batch["clm_tokens"]), float(batch["fusion_tokens"])

    def step() -> None:
        loss, _ = micro_batch_loss(model, batch, s, n_c, n_f)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return step, origin, trainable


def measure_memory(variant, args) -> int:
    """Peak bytes of two steps above the resident model (fresh process)."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    elif not reset_peak_rss():
        print("warning: cannot reset peak RSS", file=sys.stderr)
    step, _, _ = setup(args, variant)
    # The model is the same for both: measure above it, the optimizer state included.
    model_bytes = torch.cuda.memory_allocated() if cuda else rss_bytes()
    step()
    step()
    return (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - model_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model")
    p.add_argument("--random", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_bytes": measure_memory(args.memory_of, args)}))
        return
    peak = peak_memory_per_variant(__file__, sys.argv[1:], VARIANTS)
    steps, info = {}, {}
    for v in VARIANTS:
        steps[v], origin, info[v] = setup(args, v)
    best = {v: float("inf") for v in VARIANTS}
    for rnd in range(args.reps + 1):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v]()
            if rnd > 0:
                best[v] = min(best[v], time.perf_counter() - t0)
    print(
        f"model: {origin}; batch {args.batch} x {args.length}; LoRA rank {args.rank}; "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    for v in VARIANTS:
        print(
            f"{v:>5}: {info[v]:,} trainable parameters; step {best[v] * 1000:8.1f} ms; peak "
            f"above the model {peak[v] / 2**20:8.1f} MiB"
        )
    print(
        f"lora_peak_mem_ratio={peak['lora'] / peak['full']:.3f} "
        f"lora_step_time_ratio={best['lora'] / best['full']:.3f}"
    )


if __name__ == "__main__":
    main()
