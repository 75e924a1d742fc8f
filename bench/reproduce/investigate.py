"""Why does (or doesn't) fusion beat the CLM-only control? Checks on the VALIDATION split.

    python bench/reproduce/investigate.py --budget quick [same asset options as reproduce.py]

Builds on a finished (or cached) ``reproduce.py`` run of the same budget and work folder
and writes ``INVESTIGATION.md`` next to RESULTS.md. Never reads the test split. Three
questions:

1. Headroom: how much better than the base are the teachers on the *training* text the
   fusion term sees? (MinCE can transfer at most the gap between the base and the
   per-block best expert.) Bits per byte of base, each expert and the per-block best
   expert on the fusion training blocks.
2. Weight of the fusion term: λ from 0 (fusion only) to 1 (control) at the chosen lr.
3. Token budget: the same at three epochs over the training split instead of one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parent.parent / "fuselm").is_dir():
    sys.path.insert(0, str(HERE.parent.parent))

from repro_budget import BUDGETS  # noqa: E402
from reproduce import SAME3, VARIANTS, Experiment, _avg  # noqa: E402

LAMBDAS = (0.0, 0.9)  # 0.5 was tried by the tuning of reproduce.py


def headroom(exp: Experiment) -> dict[str, dict[str, float]]:
    """Bits per byte of base, experts and the per-block best expert on the training blocks."""
    from repro_score import bits_per_byte, score_model

    from fuselm.corpus import read_blocks
    from fuselm.experts import dir_digest

    blocks = read_blocks(exp.shared["mined"]).to_pylist()
    scores = {
        n: score_model(exp.models[n], blocks, exp.work / "scores", dir_digest(exp.models[n]))
        for n in ("base", *SAME3)
    }
    out = {n: bits_per_byte(s, blocks) for n, s in scores.items()}
    best = {}
    for b in blocks:  # MinCE's choice: the expert with the lowest CE per byte on the block
        h = b["hash"]
        best[h] = min((scores[n][h] for n in SAME3), key=lambda s: s.nll / max(s.n_bytes, 1))
    out["per-block best expert (MinCE teacher)"] = bits_per_byte(best, blocks)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the checks and write INVESTIGATION.md."""
    from repro_report import DOMAINS, code_state, machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    p.add_argument("--work")
    p.add_argument("--out")
    p.add_argument("--base")
    p.add_argument("--alt-tokenizer")
    p.add_argument("--shakespeare")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="investigate %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    b = BUDGETS[args.budget]
    cache = Path(os.environ.get("FUSELM_CACHE", Path.home() / ".cache" / "fuselm"))
    work = Path(args.work) if args.work else cache / "reproduce" / b.name
    out = Path(args.out) if args.out else (work if b.fixtures else HERE)
    before, code, t0 = machine_info(), code_state(), time.time()
    paths = {"base": args.base, "alt_tokenizer": args.alt_tokenizer}
    paths["shakespeare"] = args.shakespeare
    exp = Experiment(b, work, assets=paths)
    exp.run(stop_after_setup=True)
    lr = json.loads((out / "results.json").read_text())["meta"]["tuning"]["chosen"]["lr"]
    room = headroom(exp)
    spec = VARIANTS["fuselm MinCE"]
    sweep: dict[str, dict[str, float]] = {}
    for epochs in (1.0, 3.0):
        for i, lam in enumerate(LAMBDAS):
            folder = exp.runs / "investigate" / f"ep{epochs:g}-lam{lam:g}"
            mans = exp._train("inv", spec, 0, lr, lam, control=i == 0, folder=folder, epochs=epochs)
            sweep[f"epochs {epochs:g}, λ = {lam:g}"] = exp.score_trained(
                "val", f"inv {epochs} {lam}", 0, mans["fused"]
            )
            if "control" in mans:
                sweep[f"epochs {epochs:g}, λ = 1 (control)"] = exp.score_trained(
                    "val", f"inv {epochs} control", 0, mans["control"]
                )
            exp._cleanup(mans)
    lines = [
        "# Why fusion does (not) beat the control: checks on the validation split",
        "",
        "Written by `bench/reproduce/investigate.py`; do not edit by hand.",
        "",
        f"- command: `python bench/reproduce/investigate.py {' '.join(argv or sys.argv[1:])}`",
        f"- date: {before['time']}, wall {(time.time() - t0) / 60:.1f} min; machine "
        f"{before['host']}, {before['cores']} cores, load {before['load_1_5_15']} at start",
        f"- commit: {code['commit']}" + (" (with uncommitted changes)" if code["dirty"] else ""),
        f"- budget: `{b.name}`, lr {lr:g} (chosen on validation by reproduce.py), seed 0",
        "",
        "## 1. Headroom: bits per byte on the fusion TRAINING blocks",
        "",
        "| model | " + " | ".join(DOMAINS) + " | average |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for name, bpb in room.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{bpb[d]:.4f}" for d in DOMAINS) + f" | {_avg(bpb):.4f} |"
        )
    lines += [
        "",
        "## 2-3. λ and token budget (validation split, bits per byte)",
        "",
        "| run | " + " | ".join(DOMAINS) + " | average |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for name, bpb in sweep.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{bpb[d]:.4f}" for d in DOMAINS) + f" | {_avg(bpb):.4f} |"
        )
    (out / "INVESTIGATION.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / 'INVESTIGATION.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
