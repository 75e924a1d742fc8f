"""The reproduction's experiments, driven through fuselm's CLI (``fuselm.cli.main``).

Layout under the work folder ``W``::

    W/corpus/{expert,train,val,test}.jsonl   the three domains, split by document
    W/models/                                base, experts, FVT expert, merged model
    W/runs/shared-mined, shared-exact        prepare + capture (+ align) of every teacher
    W/runs/heldout-{val,test}                prepare only: the held-out blocks
    W/runs/<variant>/s<seed>                 one fusion variant, one seed: `fuselm train`
    W/scores/                                per-token scores of every model on every split

Why one run folder per variant and seed: a fuselm run dir holds one ``train/fused``. What
variants share is not recomputed: every variant folder starts as a hard-linked copy of the
shared run's ``prepare``, ``capture`` and ``align`` stages, whose manifests then match and
are skipped; only ``fuselm train`` does work. Changing a variant's sources, fusion rule or
seed leaves the captures valid (they are in each source's own vocabulary).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("reproduce")


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write a pipeline YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def fuselm(stage: str, config: Path, run_dir: Path, *overrides: str) -> None:
    """Run one ``fuselm`` stage in-process (the CLI entry point, not a private function).

    In-process rather than a subprocess: importing torch + transformers costs seconds per
    call, and the reproduction calls the CLI dozens of times.

    Raises:
        RuntimeError: the stage exited with an error (its message was printed).
    """
    from fuselm.cli import main

    argv = ["-q", stage, "-c", str(config), "-o", str(run_dir), *overrides]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"fuselm {' '.join(argv)} failed ({rc}): {err.getvalue()[-2000:]}")


def link_stages(src: Path, dst: Path, stages: Sequence[str] = ("prepare", "capture", "align")):
    """Start run dir ``dst`` as a hard-linked copy of ``src``'s finished stages.

    Hard links, not symlinks: fuselm replaces files atomically (write + rename), so a
    stage rewritten in ``dst`` never changes ``src``; and nothing is copied byte by byte.
    """
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "fuselm-run.json", dst / "fuselm-run.json")
    for name in stages:
        if (src / name).exists() and not (dst / name).exists():
            subprocess.run(["cp", "-al", str(src / name), str(dst / name)], check=True)


def base_config(
    corpus: Path,
    target: Path,
    sources: dict[str, Path],
    budget: Any,
    *,
    vocab: str = "mined",
    function: str = "min_ce",
    level: str = "sequence",
    lr: float = 1e-4,
    lam: float = 0.9,
    seed: int = 0,
    control: bool = False,
) -> dict[str, Any]:
    """A fuselm pipeline config for one variant (target not a source: sources = experts)."""
    return {
        "corpus": {
            "inputs": [{"path": str(corpus)}],
            "block_tokens": budget.block_tokens,
            "validation_fraction": 0.0,  # held-out splits are prepared separately
        },
        # Every model is scored and trained on plain text without BOS (SmolLM2's GGUF BOS
        # is a chat marker); set explicitly so tokenizer defaults cannot differ by model.
        "target": {"model": str(target), "name": "base", "as_source": False, "bos": "none"},
        "sources": [{"model": str(p), "name": n, "bos": "none"} for n, p in sources.items()],
        "capture": {"top_k": budget.top_k, "batch_tokens": 4096},
        "align": {"vocab": vocab},
        "fuse": {"function": function, "level": level},
        "train": {
            "clm_weight": lam,
            "learning_rate": lr,
            "seq_len": budget.block_tokens,
            "batch_size": budget.batch_size,
            "warmup_ratio": budget.warmup_ratio,
            "epochs": 1.0,
            "seed": seed,
        },
        "eval": {"control": control},
    }


def train_run(shared: Path, run_dir: Path, cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Train one variant in ``run_dir`` (linked to ``shared``); returns the train manifests."""
    from fuselm.artifacts import Stage

    link_stages(shared, run_dir)
    config = write_config(run_dir.parent / f"{run_dir.name}.yaml", cfg)
    fuselm("train", config, run_dir)
    out = {}
    for variant in ("fused", "control"):
        man = Stage(run_dir, f"train/{variant}").manifest()
        if man is not None:
            out[variant] = man
    return out


def prepare_shared(
    corpus: Path, target: Path, sources: dict[str, Path], budget: Any, runs: Path
) -> dict[str, Path]:
    """prepare + capture once, then align with ``mined`` and with ``exact`` vocab maps."""
    mined = runs / "shared-mined"
    cfg = write_config(runs / "shared-mined.yaml", base_config(corpus, target, sources, budget))
    for stage in ("prepare", "capture", "align"):
        fuselm(stage, cfg, mined)
    exact = runs / "shared-exact"
    link_stages(mined, exact, ("prepare", "capture"))
    cfg_e = write_config(
        runs / "shared-exact.yaml", base_config(corpus, target, sources, budget, vocab="exact")
    )
    fuselm("align", cfg_e, exact)
    return {"mined": mined, "exact": exact}


def heldout_blocks(
    corpus: Path,
    target: Path,
    sources: dict[str, Path],
    budget: Any,
    run_dir: Path,
    per_domain: int,
) -> list[dict[str, Any]]:
    """Held-out blocks that fit every model (fuselm prepare), at most ``per_domain`` each.

    Which blocks are kept is decided by their content hash, not by file order, so that
    no domain's first file dominates the few blocks a small budget scores.
    """
    from fuselm.corpus import read_blocks

    cfg = write_config(run_dir.with_suffix(".yaml"), base_config(corpus, target, sources, budget))
    fuselm("prepare", cfg, run_dir)
    rows = read_blocks(run_dir).to_pylist()
    rows.sort(key=lambda b: b["hash"])
    out: list[dict[str, Any]] = []
    count: dict[str, int] = {}
    for b in rows:
        if count.get(b["domain"], 0) < per_domain:
            out.append(b)
            count[b["domain"]] = count.get(b["domain"], 0) + 1
    return out


def align_figures(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per source: coverage, 1:1 share and top-k mass mapped exactly / by MinED / lost."""
    out = {}
    for man_path in sorted((run_dir / "align").glob("*/manifest.json")):
        stats = json.loads(man_path.read_text(encoding="utf-8")).get("stats", {})
        out[man_path.parent.name] = {
            "coverage": stats.get("coverage"),
            "one_to_one": stats.get("one_to_one_share"),
            "mass": stats.get("topk_mass"),
        }
    return out


def drop_weights(model_dir: Path) -> None:
    """Delete a scored model's weights (its scores are cached; disk is shared)."""
    for f in model_dir.glob("*.safetensors"):
        f.unlink()


def env_threads() -> int:
    """Threads torch may use (the machine is shared: the caller decides)."""
    return int(os.environ.get("REPRO_THREADS", "2"))
