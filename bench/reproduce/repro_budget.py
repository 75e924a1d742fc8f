"""Budgets of the reproduction: how much text, how many steps, which grid, how many seeds.

Every size of the experiment is set here, by name, so that RESULTS.md can say exactly
which budget produced it. ``tiny`` runs on the hermetic fixture models in seconds (what
the test suite runs); the others use SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Budget:
    """One budget of the reproduction (sizes per domain unless noted)."""

    name: str
    fixtures: bool  # tiny random fixture models instead of SmolLM2 (mechanics only)
    block_tokens: int  # block / training row length, target tokens
    piece_chars: int  # documents are cut into pieces of about this many characters
    per_doc: int  # at most this many pieces of one document (round-robin over documents)
    chars: dict[str, int]  # characters per domain: expert, train (fusion), val, test
    eval_blocks: dict[str, int]  # held-out blocks per domain scored: val, test
    expert_steps: int  # continual-training steps of each domain expert
    expert_batch: int
    expert_lr: float
    batch_size: int  # fusion / control rows per step (one epoch over the train split)
    warmup_ratio: float
    grid: tuple[tuple[float, float], ...]  # (lr, λ) tried for fusion on the val split
    seeds: tuple[int, ...]
    top_k: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for RESULTS.md and fingerprints."""
        return asdict(self)


BUDGETS: dict[str, Budget] = {
    "tiny": Budget(
        name="tiny",
        fixtures=True,
        block_tokens=48,
        piece_chars=160,
        per_doc=2,
        chars={"expert": 1200, "train": 600, "val": 300, "test": 300},
        eval_blocks={"val": 3, "test": 3},
        expert_steps=3,
        expert_batch=2,
        expert_lr=1e-3,
        batch_size=4,
        warmup_ratio=0.1,
        grid=((1e-3, 0.9), (1e-3, 0.5)),
        seeds=(0, 1, 2),
    ),
    # A smoke-scale run of every comparison on SmolLM2-135M: about 15 min of 2 idle cores
    # (50 min on a machine shared with four other jobs). Three optimiser steps per fusion
    # run: it checks the whole experiment end to end, and it cannot separate methods whose
    # differences are small.
    "quick": Budget(
        name="quick",
        fixtures=False,
        block_tokens=128,
        piece_chars=450,
        per_doc=3,
        chars={"expert": 8000, "train": 900, "val": 1200, "test": 2400},
        eval_blocks={"val": 2, "test": 4},
        expert_steps=8,
        expert_batch=4,
        expert_lr=1e-4,
        batch_size=4,
        warmup_ratio=0.1,
        grid=((2e-4, 0.9), (2e-4, 0.5)),
        seeds=(0, 1, 2),
    ),
    # The "<= 90 minutes on 2 cores" setting.
    "standard": Budget(
        name="standard",
        fixtures=False,
        block_tokens=256,
        piece_chars=900,
        per_doc=4,
        chars={"expert": 60000, "train": 16000, "val": 6000, "test": 12000},
        eval_blocks={"val": 8, "test": 16},
        expert_steps=30,
        expert_batch=4,
        expert_lr=1e-4,
        batch_size=4,
        warmup_ratio=0.1,
        grid=((1e-4, 0.9), (1e-4, 0.5), (3e-4, 0.9), (3e-4, 0.5)),
        seeds=(0, 1, 2),
    ),
    # Several hours on 2 cores; minutes on a GPU.
    "full": Budget(
        name="full",
        fixtures=False,
        block_tokens=512,
        piece_chars=1800,
        per_doc=8,
        chars={"expert": 400000, "train": 120000, "val": 20000, "test": 40000},
        eval_blocks={"val": 16, "test": 32},
        expert_steps=150,
        expert_batch=8,
        expert_lr=1e-4,
        batch_size=8,
        warmup_ratio=0.05,
        grid=((3e-5, 0.9), (1e-4, 0.9), (1e-4, 0.5), (3e-4, 0.5)),
        seeds=(0, 1, 2),
    ),
}
