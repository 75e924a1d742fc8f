"""Held-out bits per byte while training: a fixed subset of the validation blocks.

Why during training: ``fuselm eval`` measures the final models only; a user watching a
run wants to see when (and whether) the fused target pulls ahead of the control, and
``train.keep_best`` needs a measurement to select on. The same blocks are measured at
every ``train.eval_every`` steps, for the fused target and the control alike, with the
eval stage's notion of a predicted byte (:func:`fuselm.evaluate.scoring.predicted_bytes`),
so the curve ends where ``fuselm eval`` starts (on these blocks).

Under several processes each one measures an even share of the blocks (padded with
weight-0 repeats, so that FSDP/ZeRO-3 ranks run the same number of forward passes) and
the sums are added across processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.train.sparse_ce import IGNORE_INDEX, SparseTargetCE, clm_targets

LN2 = math.log(2.0)
BATCH = 4  # held-out blocks per forward pass


@dataclass(frozen=True)
class HeldOutBlock:
    """One held-out block in the target's tokens, with the bytes its predictions cover."""

    hash: str
    domain: str
    input_ids: np.ndarray  # (T,) int64
    n_bytes: int


def select_blocks(rows: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``count`` blocks spread over the domains: by hash within a domain, round-robin.

    Deterministic (a content hash, not file order), so every variant and every resume
    measures the same blocks. Conversations are left out (their scoring needs each
    model's chat rendering; ``fuselm eval`` does that).
    """
    by_dom: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["hash"]):
        if not r.get("messages"):
            by_dom.setdefault(r["domain"], []).append(r)
    out: list[dict[str, Any]] = []
    rank = 0
    while len(out) < count and any(rank < len(v) for v in by_dom.values()):
        for dom in sorted(by_dom):
            if rank < len(by_dom[dom]) and len(out) < count:
                out.append(by_dom[dom][rank])
        rank += 1
    return out


def heldout_blocks(run_dir: Path, tokenizer: Any, bos: str, count: int) -> list[HeldOutBlock]:
    """The validation blocks to measure, tokenized as the capture stage does for the target.

    Args:
        run_dir: the run directory (its ``prepare`` validation split).
        tokenizer: the target's fast tokenizer.
        bos: the target's BOS policy.
        count: how many blocks.

    Returns:
        Up to ``count`` blocks (fewer when the split is smaller; none when it is empty).
    """
    from fuselm.align.blocks import encode_target
    from fuselm.corpus import read_blocks
    from fuselm.evaluate.scoring import predicted_bytes

    rows = select_blocks(read_blocks(run_dir, "validation").to_pylist(), count)
    toks = encode_target(tokenizer, [r["text"] for r in rows], bos)
    return [
        HeldOutBlock(
            r["hash"],
            r["domain"],
            np.asarray(t.token_ids, np.int64),
            predicted_bytes(r["text"], t.token_ids, t.offsets),
        )
        for r, t in zip(rows, toks, strict=True)
        if len(t.token_ids) > 1
    ]


class HeldOut:
    """Measures a model's bits per byte per domain (and ``all``) on fixed blocks."""

    def __init__(self, blocks: Sequence[HeldOutBlock], pad_id: int = 0) -> None:
        """Keep the blocks (in a fixed order) and the padding id used to batch them."""
        self.blocks = list(blocks)
        self.pad_id = int(pad_id)
        self.domains = sorted({b.domain for b in self.blocks})

    def __len__(self) -> int:
        return len(self.blocks)

    def measure(self, model: Any, acc: Any, autocast: Any) -> dict[str, float]:
        """Bits per byte of ``model`` per domain and ``all`` (every process takes part).

        Args:
            model: the (possibly wrapped) model; put in eval mode here and back to train.
            acc: the ``accelerate.Accelerator`` (device, ranks, reduction).
            autocast: a context manager factory for the training precision.

        Returns:
            ``{domain: bits per byte, ..., "all": ...}``.
        """
        import torch

        world, rank = acc.num_processes, acc.process_index
        per = math.ceil(len(self.blocks) / world)
        mine = [(i, True) for i in range(rank, len(self.blocks), world)]
        mine += [(0, False)] * (per - len(mine))  # weight-0 repeats: same forwards per rank
        index = {d: j for j, d in enumerate(self.domains)}
        sums = torch.zeros(2 * len(self.domains), dtype=torch.float64, device=acc.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(mine), BATCH):
                part = mine[start : start + BATCH]
                rows = [self.blocks[i] for i, _ in part]
                width = max(len(b.input_ids) for b in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
                for r, b in enumerate(rows):
                    ids[r, : len(b.input_ids)] = torch.from_numpy(b.input_ids)
                    labels[r, : len(b.input_ids)] = ids[r, : len(b.input_ids)]
                ids, labels = ids.to(acc.device), labels.to(acc.device)
                with autocast():
                    logits = model(input_ids=ids, use_cache=False).logits
                # The training loss's chunked kernel: no (B, T, V) log-softmax is built.
                mask, next_ids = clm_targets(labels, IGNORE_INDEX)
                _, nll = SparseTargetCE.apply(
                    logits, None, None, None, 1.0, next_ids, mask, None
                )  # (B, W)
                per_row = torch.where(mask, nll, 0.0).double().sum(-1)
                for r, ((_, real), b) in enumerate(zip(part, rows, strict=True)):
                    if real:
                        j = index[b.domain]
                        sums[2 * j] += per_row[r]
                        sums[2 * j + 1] += b.n_bytes
        if was_training:
            model.train()
        if world > 1:
            sums = acc.reduce(sums, "sum")
        values = sums.tolist()
        out = {}
        total_nll = total_bytes = 0.0
        for d, j in index.items():
            nll, nbytes = values[2 * j], values[2 * j + 1]
            out[d] = nll / nbytes / LN2 if nbytes else float("nan")
            total_nll, total_bytes = total_nll + nll, total_bytes + nbytes
        out["all"] = total_nll / total_bytes / LN2 if total_bytes else float("nan")
        return {k: round(v, 6) for k, v in out.items()}
