"""Shared fixtures: tiny tokenizers and models of several families, and a run-config writer.

Everything is built in-process and offline; nothing here touches a model hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from fuselm.testing import build_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny saved models: target (bpe, llama), spm (gpt2 arch), wordpiece, padded-vocab bpe."""
    root = tmp_path_factory.mktemp("models")
    return {
        "bpe": save_tiny_model(root / "bpe", build_tokenizer("bpe"), max_positions=128),
        "spm": save_tiny_model(root / "spm", build_tokenizer("spm"), arch="gpt2", max_positions=96),
        "wordpiece": save_tiny_model(root / "wordpiece", build_tokenizer("wordpiece")),
        "padded": save_tiny_model(root / "padded", build_tokenizer("bpe"), vocab_rows=640),
    }


@pytest.fixture
def write_config(tmp_path):
    """Write a pipeline YAML into tmp_path and return its path."""

    def write(data: dict[str, Any], name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """A small two-domain corpus: a folder of Python files and a jsonl with domains."""
    import json
    import shutil
    import sysconfig

    code = tmp_path / "data" / "code"
    code.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in ("textwrap.py", "this.py", "json/decoder.py", "colorsys.py"):
        shutil.copy(stdlib / rel, code / rel.replace("/", "_"))
    lines = []
    for i in range(12):
        dom = "prose" if i % 2 else "misc"
        text = f"Document {i}.\n" + "Café au lait, 東京 🙂 and 12345 apples.\n" * (i + 1)
        lines.append(json.dumps({"text": text, "domain": dom}, ensure_ascii=False))
    lines.append(json.dumps({"text": "   \n\t"}))  # whitespace-only: skipped, counted
    (tmp_path / "data" / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "data"


@pytest.fixture
def base_config(tiny_models, corpus_dir) -> dict[str, Any]:
    """A three-model pipeline over the small corpus (as a dict, ready to tweak)."""
    return {
        "corpus": {
            "inputs": [
                {"path": str(corpus_dir / "code"), "domain": "code", "glob": "*.py"},
                {"path": str(corpus_dir / "docs.jsonl")},
            ],
            "block_tokens": 200,
            "validation_fraction": 0.25,
        },
        "target": {"model": str(tiny_models["bpe"]), "name": "tgt"},
        "sources": [
            {"model": str(tiny_models["spm"]), "name": "spm"},
            {"model": str(tiny_models["wordpiece"]), "name": "wp"},
        ],
        # keep `fuselm run` in tests to a few optimiser steps
        "train": {"max_steps": 3, "seq_len": 128, "batch_size": 2},
    }


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (use with ``pytest.mark.usefixtures``).

    Tiny models: thread start-up costs more than it saves, and on a busy 2-core machine
    two spinning OpenMP threads per process slow a step down a hundredfold.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
