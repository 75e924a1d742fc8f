"""Peak memory of `fuselm merge` (streaming) against loading every model, for N models.

Builds N random Llama-style models (``--hidden``, ``--layers``) in a scratch folder, then
in a fresh process per variant measures the peak resident memory *above the process's
memory before merging*, in units of one model's weights:

- ``stream-N``: ``fuselm.merge.stage.run_merge`` (SCE, base + N models);
- ``naive-N``: the baseline, in the same run: load the base and all N state dicts, then
  merge them with the same rule.

The last line is ``merge_peak_models stream=<x,..> naive=<y,..> n=<N,..>``. The streaming
merge holds one output shard (the limit is set large here, so the whole merged model:
one model) plus one tensor per input; measured here at hidden 384 / 6 layers it stays
around two models (1.5, 1.75, 2.3 for N = 2, 4, 8) while loading everything grows
linearly (4.4, 6.5, 10.8). Timings are not the point (2 shared CPU cores).

    python bench/merge_bench.py --hidden 384 --layers 6 --n 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_memory_per_variant  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(root: Path, hidden: int, layers: int, n: int) -> list[Path]:
    from fuselm.testing import build_tokenizer, save_tiny_model

    tok = build_tokenizer("bpe")
    paths = []
    for i in range(n + 1):  # index 0 = the base
        p = root / f"m{i}"
        if not (p / "config.json").exists():
            save_tiny_model(p, tok, hidden=hidden, layers=layers, heads=4, seed=i)
        paths.append(p)
    return paths


def _child(root: Path, variant: str) -> None:
    import torch
    from safetensors.torch import load_file

    import fuselm.models  # noqa: F401  (imports are not the merge's memory)
    import fuselm.progress  # noqa: F401
    from fuselm.config import load_config
    from fuselm.merge.methods import MergeParams, get_merge_method
    from fuselm.merge.stage import run_merge

    kind, n = variant.split("-")
    paths = sorted(root.glob("m*"), key=lambda p: int(p.name[1:]))[: int(n) + 1]
    base, models = paths[0], paths[1:]
    before = _rss()
    if kind == "stream":
        cfg = load_config(
            None,
            [
                "merge.method=sce",
                f"merge.base={base}",
                f"merge.models={[str(m) for m in models]}",
                "merge.max_shard_mb=100000",
            ],
        )
        with tempfile.TemporaryDirectory() as out:
            run_merge(cfg, Path(out))
    else:
        sds = [load_file(str(m / "model.safetensors")) for m in models]
        b = load_file(str(base / "model.safetensors"))
        rule = get_merge_method("sce")
        merged = {
            k: rule(
                torch.stack([sd[k] for sd in sds]), b[k], torch.ones(len(sds)), MergeParams(), k
            )
            for k in b
        }
        del merged
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": max(peak - before, 0)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--root", default="/tmp/fuselm-merge-bench")
    ap.add_argument("--memory-of", default="")
    args = ap.parse_args()
    root = Path(args.root)
    if args.memory_of:
        _child(root, args.memory_of)
        return
    paths = _build(root, args.hidden, args.layers, max(args.n))
    model_bytes = (paths[0] / "model.safetensors").stat().st_size
    print(f"one model: {model_bytes / 1e6:.1f} MB of weights")
    variants = [f"{k}-{n}" for n in args.n for k in ("stream", "naive")]
    argv = ["--root", str(root)]
    peaks = peak_memory_per_variant(__file__, argv, variants)
    stream, naive = [], []
    for n in args.n:
        s, v = peaks[f"stream-{n}"] / model_bytes, peaks[f"naive-{n}"] / model_bytes
        stream.append(f"{s:.2f}")
        naive.append(f"{v:.2f}")
        print(f"N={n}: peak above start, in models: streaming merge {s:.2f}, load-all {v:.2f}")
    print(
        f"merge_peak_models stream={','.join(stream)} naive={','.join(naive)} "
        f"n={','.join(map(str, args.n))}"
    )


if __name__ == "__main__":
    main()
