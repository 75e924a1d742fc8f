"""How many training steps does each demo expert need to beat SmolLM2 on its own domain?

    python bench/demo_expert_budget.py --run-dir RUN [--steps 16 20 32] [--threads 2]

Why: the demo's first run must fit in 20 minutes on a 2-core CPU, and the two expert
trainings are its largest cost (about 8.6 s per 4 x 256-token step). Fewer steps are only
acceptable if each expert still beats the untouched target on its domain, otherwise fusion
has nothing to transfer. This script decides that **without touching the held-out split**:
it scores on the *training* blocks of a finished demo run (``RUN/prepare``, split
``train``), which the experts never saw either (their texts are other plays and other
manual topics, checked by ``fuselm.demo.corpus.expert_texts``).

Needs the demo's cache (``$FUSELM_CACHE``, the one the demo run used). For each expert and
each step count it trains a fresh expert with the demo's recipe (same data, lr, seed,
warm-up rule) into a temporary folder, then prints bits per byte on the expert's domain,
the untouched target's, and the margin. The expert of the cache (the demo's current budget)
is scored too, as the baseline row. Prints figures, never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _score(model_dir: Path, blocks: list[dict], name: str) -> float:
    """Bits per byte of a local model on ``blocks`` (no BOS, as in the demo)."""
    from fuselm.config import ModelConfig
    from fuselm.evaluate.scoring import aggregate, own_scores, score_blocks
    from fuselm.models import load_causal_lm, load_tokenizer, model_context

    m = ModelConfig(model=str(model_dir), name=name, bos="none", dtype="float32", device="cpu")
    model = load_causal_lm(m)
    scores = score_blocks(
        model, load_tokenizer(m), blocks, name=name, bos="none", max_context=model_context(m)
    )
    return aggregate(own_scores(scores))["overall"]["bits_per_byte"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a finished `fuselm demo` run (its prepare)")
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 20, 32])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch

    from fuselm.assets import cache_dir, shakespeare_texts, smollm2_dir
    from fuselm.corpus import read_blocks
    from fuselm.demo import choose_threads
    from fuselm.demo.build import EXPERTS, TOKENIZERS
    from fuselm.demo.corpus import demo_documents, expert_texts
    from fuselm.experts import continual_train, transplant_vocabulary

    torch.set_num_threads(choose_threads(args.threads))
    cache = cache_dir()
    plays = shakespeare_texts()
    texts = expert_texts(plays, demo_documents(plays))
    train = read_blocks(Path(args.run_dir), split="train").to_pylist()
    target = smollm2_dir(cache)
    tmp = Path(tempfile.mkdtemp(prefix="expert-budget-"))
    print(f"training blocks of {args.run_dir} (held-out split not read); experts under {tmp}")
    rows = []
    for spec in EXPERTS:
        blocks = [b for b in train if b["domain"] == spec.domain]
        base = _score(target, blocks, "smollm2")
        tok_dir = TOKENIZERS[spec.tokenizer](cache)
        fvt = transplant_vocabulary(target, tok_dir, cache / "demo" / f"fvt-{spec.tokenizer}")
        candidates = [(spec.steps, cache / "demo" / spec.name, 0.0)]
        for steps in args.steps:
            t = time.perf_counter()
            out = continual_train(
                fvt,
                texts[spec.domain],
                tmp / f"{spec.name}-{steps}",
                steps=steps,
                seq_len=spec.seq_len,
                batch_size=spec.batch_size,
                lr=spec.lr,
                seed=0,
                desc=f"{spec.name} {steps} steps",
            )
            candidates.append((steps, out, time.perf_counter() - t))
        for steps, path, secs in candidates:
            if not path.exists():
                print(f"{spec.name}: no cached expert at {path}; skipped")
                continue
            bpb = _score(path, blocks, spec.name)
            rows.append((spec.name, spec.domain, len(blocks), steps, secs, bpb, base))
            print(
                f"{spec.name:18s} {spec.domain:12s} steps {steps:3d}  train {secs:6.0f} s  "
                f"expert {bpb:.4f}  target {base:.4f}  margin {base - bpb:+.4f} bits/byte",
                flush=True,
            )
    print("\nexpert | domain | blocks | steps | train s | expert bpb | target bpb | margin")
    print("---|---|---|---|---|---|---|---")
    for r in rows:
        print(
            f"{r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.4f} | {r[6]:.4f} "
            f"| {r[6] - r[5]:+.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
