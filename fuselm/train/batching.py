"""Batching of training rows: which rows each optimiser step uses, and padding.

:func:`plan_steps` fixes, from the seed and the global batch alone, the rows of every step
(so a resumed run needs nothing but the step number, and runs on any number of processes
see the same rows); :func:`rank_slice` gives each process its share of a micro-batch;
:func:`collate` pads one micro-batch to its longest row.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from fuselm.train.data import TrainDataError, TrainExample
from fuselm.train.losses import IGNORE_INDEX

# Optimiser steps per length-bucketing window: examples are sorted by length within a
# window of this many steps and the steps of the window are then shuffled, so batches hold
# similar lengths without a long-to-short curriculum over the run.
BUCKET_STEPS = 32


# --------------------------------------------------------------------------- order


def count_steps(n_examples: int, global_batch: int, epochs: float, max_steps: int) -> int:
    """Optimiser steps of a run: ``max_steps`` if set, else enough to cover ``epochs``."""
    if max_steps > 0:
        return max_steps
    if n_examples == 0:
        return 0
    return max(1, math.ceil(epochs * n_examples / global_batch))


def plan_steps(
    lengths: Sequence[int],
    *,
    steps: int,
    micro_batch: int,
    grad_accum: int,
    seed: int,
    bucket_steps: int = BUCKET_STEPS,
) -> list[list[list[int]]]:
    """Which examples each optimiser step uses: fixed by the seed, lengths and batch shape.

    The example stream is the concatenation of per-epoch permutations (epoch ``e``
    shuffled with ``(seed, e)``), so fractional epochs and ``max_steps`` beyond one epoch
    need no special case. The stream is cut into windows of ``bucket_steps`` steps; in a
    window examples are sorted by length (longest first), cut into micro-batches and
    steps, and the steps are shuffled. Every step takes ``micro_batch * grad_accum``
    examples.

    ``micro_batch`` is the GLOBAL micro-batch (per-device batch x processes): the plan
    depends only on the global batch, so one process with batch 2, two processes with
    batch 1 and one process with batch 1 and 2 accumulation steps train on the same
    examples at every step.

    Args:
        lengths: length of every example.
        steps: number of optimiser steps.
        micro_batch: examples per global micro-batch.
        grad_accum: micro-batches per step.
        seed: the training seed.
        bucket_steps: steps per bucketing window.

    Returns:
        ``plan[step][micro] = [example indices]``; split a micro-batch across processes
        with :func:`rank_slice`.
    """
    n = len(lengths)
    if n == 0 or steps == 0:
        return []
    per_step = micro_batch * grad_accum
    need = steps * per_step
    stream: list[np.ndarray] = []
    have, epoch = 0, 0
    while have < need:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        stream.append(perm)
        have += n
        epoch += 1
    order = np.concatenate(stream)[:need]
    lens = np.asarray(lengths, dtype=np.int64)
    plan: list[list[list[int]]] = []
    window = per_step * bucket_steps
    for w, start in enumerate(range(0, need, window)):
        chunk = order[start : start + window]
        # Sort by length, longest first; ties keep stream order (stable).
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        window_steps = [
            [
                chunk[s + m * micro_batch : s + (m + 1) * micro_batch].tolist()
                for m in range(grad_accum)
            ]
            for s in range(0, len(chunk), per_step)
        ]
        shuffle = np.random.default_rng([seed, 1_000_003, w]).permutation(len(window_steps))
        plan.extend(window_steps[i] for i in shuffle)
    return plan


def rank_slice(micro: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share of a global micro-batch (strided: similar lengths per rank)."""
    return list(micro[rank::world])


def step_digest(examples: Sequence[TrainExample], step: Sequence[Sequence[int]]) -> str:
    """Short digest of the rows a step trains on (to compare runs and resumes in logs)."""
    h = hashlib.sha256()
    for micro in step:
        for i in micro:
            h.update(f"{examples[i].hash}:{examples[i].part};".encode())
        h.update(b"|")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- collate


def collate(
    examples: Iterable[TrainExample], pad_id: int = 0, with_teacher: bool = True
) -> dict[str, torch.Tensor]:
    """Pad one micro-batch to its longest row (not to ``seq_len``).

    Teacher rows are placed at the logits position they belong to: row ``t`` of an
    example at position ``t`` (which predicts token ``t + 1``); its last position and the
    padding get no teacher (-1 ids, -inf log-probs).

    Args:
        examples: the rows of the micro-batch.
        pad_id: token id used for padding (any valid id; its labels are ignored).
        with_teacher: also build the teacher tensors (False for CLM-only training).

    Returns:
        ``input_ids (B, L)`` int64, ``labels (B, L)`` int64 (-100 on padding),
        ``teacher_ids (B, L, K)`` int64 (-1 padded), ``teacher_logprobs (B, L, K)``
        float32, ``teacher_tail_logmass (B, L)`` float32 (-inf where none) and
        ``teacher_source (B, L)`` int64 (the leading teacher; -1 none, -2 gold) when
        ``with_teacher``, and the counts ``clm_tokens`` / ``fusion_tokens``
        (0-dim int64): positions with a next-token target, and those of them that have a
        teacher entry (exactly what :func:`fuselm.train.losses.combined_loss` averages
        over).
    """
    rows = list(examples)
    if not rows:
        raise TrainDataError("collate needs at least one example")
    batch, length = len(rows), max(len(e) for e in rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    clm_tokens = 0
    for r, e in enumerate(rows):
        ids = torch.from_numpy(np.asarray(e.input_ids, dtype=np.int64))
        input_ids[r, : len(e)] = ids
        labels[r, : len(e)] = ids
        if e.target_mask is not None:  # chat: position t trains only if mask[t]
            keep = torch.from_numpy(np.asarray(e.target_mask, dtype=bool))
            labels[r, 1 : len(e)][~keep] = IGNORE_INDEX
            clm_tokens += int(keep.sum())
        else:
            clm_tokens += max(len(e) - 1, 0)
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "clm_tokens": torch.tensor(clm_tokens),
    }
    if not with_teacher:
        out["fusion_tokens"] = torch.tensor(0)
        return out
    missing = [e.block_id for e in rows if e.teacher_ids is None]
    if missing:
        raise TrainDataError(f"rows without a teacher in a fusion batch: {missing[:3]}")
    k = max(int(e.teacher_ids.shape[1]) for e in rows)  # type: ignore[union-attr]
    t_ids = torch.full((batch, length, k), -1, dtype=torch.long)
    t_lp = torch.full((batch, length, k), float("-inf"), dtype=torch.float32)
    t_tail = torch.full((batch, length), float("-inf"), dtype=torch.float32)
    t_src = torch.full((batch, length), -1, dtype=torch.long)
    for r, e in enumerate(rows):
        p, w = e.teacher_ids.shape  # type: ignore[union-attr]
        t_ids[r, :p, :w] = torch.from_numpy(np.asarray(e.teacher_ids, dtype=np.int64))
        t_lp[r, :p, :w] = torch.from_numpy(np.asarray(e.teacher_logprobs, dtype=np.float32))
        if e.teacher_tail is not None:
            t_tail[r, :p] = torch.from_numpy(np.asarray(e.teacher_tail, dtype=np.float32))
        if e.teacher_source is not None:
            t_src[r, :p] = torch.from_numpy(np.asarray(e.teacher_source, dtype=np.int64))
    has_teacher = ((t_ids >= 0) & torch.isfinite(t_lp)).any(-1)  # (B, L)
    out.update(
        teacher_ids=t_ids,
        teacher_logprobs=t_lp,
        teacher_tail_logmass=t_tail,
        teacher_source=t_src,
        fusion_tokens=has_teacher.sum(),
    )
    return out
