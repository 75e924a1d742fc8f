"""The scaling model of docs/scaling.md: disk, time and memory per stage at 1x/10x/100x.

Usage::

    python bench/scaling_model.py --prepare-rate R --align-rate R --fuse-rate R \\
        --capture-bpp B --align-bpp B [--gpu a100|h100] [--mfu-train 0.4] [--mfu-infer 0.5]

Measured inputs (this machine, ``bench/scale_bench.py``; capture bytes per position from
``bench/capture_bench.py``) are passed in; everything else is a stated assumption, printed
with the tables. Pure arithmetic, no model runs: the output is extrapolated, not measured.

Model (per token of the corpus, T tokens, S teachers of P parameters, G GPUs):

- prepare: single process; tokenizes every block with each distinct tokenizer (``n_tok``)
  at the measured rate (tokenizer-tokens per second, one core).
- capture: forward FLOPs ``2·P + 2·L·ctx·d`` per token (weights + causal attention) per
  teacher, at ``peak · mfu_infer`` per GPU; disk ``capture_bpp`` per position per teacher.
- align: CPU, shards split across the launcher's processes (one per GPU rank by default,
  ``--align-procs``) at the measured positions per second per core; disk ``align_bpp``
  per position per teacher.
- train: ``6·P + 6·L·ctx·d`` FLOPs per token at ``peak · mfu_train``; the fusion data path
  (decode, join, fuse, collate) runs in each training process at the measured rate.
- online: train + every teacher's forward in the same loop; no teacher disk.
"""

from __future__ import annotations

import argparse

# Dense BF16 tensor-core peak, FLOP/s, without sparsity. Sources: NVIDIA A100 datasheet
# (312 TFLOPS BF16), NVIDIA H100 SXM datasheet (989 TFLOPS BF16 dense; 1,979 with sparsity).
PEAK = {"a100": 312e12, "h100": 989e12}
MEMORY_GB = {"a100": 40, "h100": 80}

# Llama-2-7B shape (the paper's target and source #0; OpenLLaMA-7B and MPT-7B are alike).
PARAMS = 6.74e9
LAYERS, D_MODEL, CTX = 32, 4096, 2048


def flops_per_token(train: bool) -> float:
    """Forward (2·P) or train (6·P) FLOPs per token, plus causal attention at CTX."""
    attn = 2 * LAYERS * CTX * D_MODEL  # QK^T and AV, causal average over CTX/2, x2 FLOPs
    return (6 if train else 2) * PARAMS + (3 if train else 1) * attn


def hours(seconds: float) -> str:
    """A duration in hours (or days past 48 h)."""
    h = seconds / 3600
    return f"{h:,.1f} h" if h < 48 else f"{h / 24:,.1f} d"


def model(a: argparse.Namespace, scale: int) -> dict[str, object]:
    """Every figure of one scale (tokens and GPUs both x ``scale``)."""
    tokens = 1.8e9 * scale
    gpus = 8 * scale
    teachers = 3
    peak = PEAK[a.gpu]
    cap_s = teachers * tokens * flops_per_token(False) / (gpus * peak * a.mfu_infer)
    train_s = tokens * flops_per_token(True) / (gpus * peak * a.mfu_train)
    per_gpu_tok_s = tokens / train_s / gpus  # what the data path must keep up with
    prep_s = a.tokenizers * tokens / a.prepare_rate
    procs = a.align_procs * scale if a.align_procs else gpus
    align_s = teachers * tokens / (a.align_rate * procs)
    stages = {
        "prepare (1 process, CPU)": prep_s,
        f"capture ({gpus} GPUs)": cap_s,
        f"align ({procs} CPU processes)": align_s,
        f"train ({gpus} GPUs)": train_s,
    }
    offline_total = sum(stages.values())
    online_s = prep_s + cap_s + train_s  # teachers inside the loop: their FLOPs, no align pass
    return {
        "tokens": tokens,
        "gpus": gpus,
        "stages": stages,
        "bottleneck": max(stages, key=lambda k: stages[k]),
        "offline_total": offline_total,
        "online_total": online_s,
        "disk_capture_gb": teachers * tokens * a.capture_bpp / 1e9,
        "disk_align_gb": teachers * tokens * a.align_bpp / 1e9,
        "fuse_cores_per_gpu": per_gpu_tok_s / a.fuse_rate,
        "per_gpu_tok_s": per_gpu_tok_s,
    }


def main() -> None:
    """Print the tables of docs/scaling.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare-rate", type=float, required=True, help="tokenizer-tokens/s, 1 core")
    p.add_argument("--align-rate", type=float, required=True, help="positions/s, 1 core")
    p.add_argument("--fuse-rate", type=float, required=True, help="positions/s, 1 core")
    p.add_argument("--capture-bpp", type=float, required=True, help="capture bytes/position")
    p.add_argument("--align-bpp", type=float, required=True, help="align bytes/position")
    p.add_argument("--tokenizers", type=int, default=3, help="distinct tokenizers (paper: 3)")
    p.add_argument(
        "--align-procs", type=int, default=0, help="align processes at 1x (0 = one per GPU)"
    )
    p.add_argument("--gpu", choices=sorted(PEAK), default="a100")
    p.add_argument("--mfu-train", type=float, default=0.4)
    p.add_argument("--mfu-infer", type=float, default=0.5)
    a = p.parse_args()
    print(
        f"GPU {a.gpu} ({PEAK[a.gpu] / 1e12:.0f} TFLOPS bf16 dense, {MEMORY_GB[a.gpu]} GB), "
        f"MFU train {a.mfu_train}, inference {a.mfu_infer}; 7B = {PARAMS:.3g} params, "
        f"{LAYERS} layers, d {D_MODEL}, ctx {CTX}; 3 teachers (target = source #0)\n"
    )
    rows = [model(a, s) for s in (1, 10, 100)]
    head = "| | 1x: 1.8B tokens, 8 GPUs | 10x: 18B, 80 GPUs | 100x: 180B, 800 GPUs |"
    print(head)
    print("|---|---|---|---|")
    for stage_idx in range(4):
        name = list(rows[0]["stages"])[stage_idx].split(" (")[0]
        vals = [hours(list(r["stages"].values())[stage_idx]) for r in rows]
        where = list(rows[0]["stages"])[stage_idx].split(" (")[1].rstrip(")")
        where = "GPUs" if "GPU" in where else ("CPU, 1 per GPU rank" if "CPU p" in where else where)
        print(f"| {name} ({where}) | " + " | ".join(vals) + " |")
    print(
        "| **bottleneck** | " + " | ".join(str(r["bottleneck"]).split(" (")[0] for r in rows) + " |"
    )
    print(
        "| offline, all stages in sequence | "
        + " | ".join(hours(r["offline_total"]) for r in rows)
        + " |"
    )
    print(
        "| online (prepare + teachers in the loop + train) | "
        + " | ".join(hours(r["online_total"]) for r in rows)
        + " |"
    )
    print(
        "| capture disk (offline) | "
        + " | ".join(f"{r['disk_capture_gb']:,.0f} GB" for r in rows)
        + " |"
    )
    print(
        "| align disk (offline) | "
        + " | ".join(f"{r['disk_align_gb']:,.0f} GB" for r in rows)
        + " |"
    )
    print(
        "| training tokens/s per GPU | "
        + " | ".join(f"{r['per_gpu_tok_s']:,.0f}" for r in rows)
        + " |"
    )
    print(
        "| CPU cores per GPU for the fusion data path | "
        + " | ".join(f"{r['fuse_cores_per_gpu']:.2f}" for r in rows)
        + " |"
    )
    w = PARAMS * 2 / 1e9  # bf16 weights, GB
    print(
        f"\nGPU memory per GPU (GB, estimates; +act = activations): capture holds one "
        f"teacher in bf16 ({w:.1f}) and one batch (top-k in chunks, never full logits); "
        f"train with ZeRO-3/FSDP over G GPUs holds 16 B/param (fp32 master, grads, AdamW "
        f"moments) = {PARAMS * 16 / 1e9:.0f}/G; online adds every teacher's bf16 weights."
    )
    for g in (8, 80, 800):
        train = PARAMS * 16 / 1e9 / g
        print(
            f"  G={g}: capture {w:.1f}+act; train {train:.1f}+act; online "
            f"{train + 3 * w:.1f}+act (3 teachers); {a.gpu} has {MEMORY_GB[a.gpu]} GB"
        )


if __name__ == "__main__":
    main()
