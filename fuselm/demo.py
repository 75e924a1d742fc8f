"""``fuselm demo``: the built-in default run, offline, on a laptop CPU.

Until the real demo lands (SmolLM2-135M with two differently tokenised experts, issue #7),
this runs every *implemented* stage on a real corpus that ships with every Python (the
standard library's source) and small models of three tokenizer families built in-process,
so that a newcomer sees the pipeline, its artifacts and ``fuselm status`` in a minute.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any

import yaml


def cache_dir() -> Path:
    """Where built demo assets are cached (``FUSELM_CACHE`` or ``~/.cache/fuselm``)."""
    return Path(os.environ.get("FUSELM_CACHE", Path.home() / ".cache" / "fuselm"))


def build_demo_models(root: Path) -> dict[str, Path]:
    """Build (once) small random models with byte-level BPE, SentencePiece and WordPiece."""
    from fuselm.testing import build_tokenizer, save_tiny_model

    specs = {
        "target-bpe": ("bpe", "llama", 512),
        "source-spm": ("spm", "gpt2", 384),
        "source-wordpiece": ("wordpiece", "llama", 512),
    }
    out = {}
    for name, (family, arch, ctx) in specs.items():
        path = root / name
        if not (path / "config.json").exists():
            save_tiny_model(path, build_tokenizer(family), arch=arch, hidden=64, max_positions=ctx)
        out[name] = path
    return out


def demo_config(run_dir: Path, models: dict[str, Path], quick: bool = False) -> dict[str, Any]:
    """The demo pipeline: stdlib source, three tokenizer families.

    ``quick`` shrinks it to a smoke run of well under a minute (one small package, a few
    training steps, a few evaluation blocks): what the test suite runs.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "corpus": {
            "inputs": [
                {"path": str(stdlib / "json"), "glob": "*.py", "domain": "code"},
                {
                    "path": str(stdlib / "email"),
                    "glob": "*.py",
                    "domain": "code",
                    "max_documents": 12,
                },
            ],
            "block_tokens": 256,
            "validation_fraction": 0.15,
        },
        "target": {"model": str(models["target-bpe"]), "name": "target"},
        "sources": [
            {"model": str(models["source-spm"]), "name": "spm"},
            {"model": str(models["source-wordpiece"]), "name": "wordpiece"},
        ],
        "capture": {"batch_tokens": 4096},
        # A short continual training (the models are random: this shows the mechanics,
        # the real fusion demo with SmolLM2 is issue #7).
        "train": {
            "max_steps": 40,
            "seq_len": 256,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.1,
        },
        "eval": {"control": True, "max_blocks": 32},
    }
    if quick:
        cfg["corpus"]["inputs"] = cfg["corpus"]["inputs"][:1]
        cfg["corpus"]["validation_fraction"] = 0.3
        cfg["train"]["max_steps"] = 4
        cfg["eval"]["max_blocks"] = 6
    return cfg


def write_demo_config(run_dir: Path, quick: bool = False) -> Path:
    """Build the demo models if needed and write ``<run_dir>.yaml`` beside the run dir."""
    models = build_demo_models(cache_dir() / "demo-models")
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by `fuselm demo`; rerun any stage with: fuselm <stage> -c this-file\n"
        + yaml.safe_dump(demo_config(run_dir, models, quick), sort_keys=False),
        encoding="utf-8",
    )
    return path
