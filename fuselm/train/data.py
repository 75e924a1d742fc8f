"""Training data of stage 5: aligned teachers joined, fused, cut into rows and batched.

Reading top to bottom:

1. :func:`join_sources` joins every teacher's :class:`~fuselm.align.records.AlignedBlock`
   by content hash (never by row index, SPEC §3) and checks that all teachers saw the same
   target tokens of every block.
2. :func:`fuse_block` fuses one block's teachers with a rule of :mod:`fuselm.fuse`
   (sequence-level rules compare the sources' per-byte CE on the *whole* block, not just
   on the positions alignment could match) and applies the fallback to the positions no
   teacher covers: the one-hot of the NEXT gold token, or masking.
3. :func:`build_examples` turns fused blocks into :class:`TrainExample` rows of at most
   ``seq_len`` tokens (longer blocks are split, see :func:`split_rows`).
4. :mod:`fuselm.train.batching` then fixes which rows every optimiser step uses and pads
   them into batches.

One block per row, never packed: a position's teacher row then stays attached to the
token it belongs to by construction, and no position attends across documents. Length
bucketing (sorting within windows of steps) keeps the padding small instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fuselm.align.records import AlignedBlock
from fuselm.fuse import fill_fallback, get_fusion, stack_sources

FALLBACKS = ("one_hot_next", "mask")


class TrainDataError(ValueError):
    """The aligned inputs cannot be turned into training data; the message says why."""


@dataclass
class TrainExample:
    """One training row: target tokens and, for fusion, the teacher of every position.

    Attributes:
        hash: content hash of the block the row comes from.
        block_id: ``doc_id#index`` of that block (for messages).
        part: index of the row within its block (> 0 only for split blocks).
        input_ids: ``(L,)`` int64 target token ids, ``L <= seq_len``.
        teacher_ids: ``(L - 1, K)`` int32 fused teacher ids in the target vocabulary for
            the positions ``0..L-2`` (position t predicts token t+1), -1 padded; rows of
            only -1 are masked out of the fusion loss. None for a CLM-only row.
        teacher_logprobs: ``(L - 1, K)`` float32 their log-probabilities, -inf on padding.
        target_mask: ``(L - 1,)`` bool, chat rows only: positions trained at all (the
            token they predict is assistant text); the rest is masked out of the CLM
            term (labels -100) and carries no teacher. None = every position.
    """

    hash: str
    block_id: str
    part: int
    input_ids: np.ndarray
    teacher_ids: np.ndarray | None = None
    teacher_logprobs: np.ndarray | None = None
    target_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class FusionStats:
    """What fusion did over the whole training set (for the stage manifest).

    Attributes:
        sources: teacher names, in fusion order.
        blocks: blocks fused.
        positions: target positions (``sum(T - 1)``).
        selected: per source, positions at which it had the largest weight (MinCE: was
            chosen).
        no_teacher: positions no source covered (fallback applied there).
        fallback: ``one_hot_next`` or ``mask``.
        max_width: widest fused row (entries per position) before any cap.
    """

    sources: list[str]
    blocks: int = 0
    positions: int = 0
    selected: list[int] = field(default_factory=list)
    no_teacher: int = 0
    fallback: str = "one_hot_next"
    max_width: int = 0
    by_domain: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures with shares."""
        total = max(sum(self.selected), 1)
        pos = max(self.positions, 1)
        return {
            "blocks": self.blocks,
            "positions": self.positions,
            "selection_share_by_domain": {
                dom: {
                    src: round(n / max(sum(counts), 1), 6)
                    for src, n in zip(self.sources, counts, strict=True)
                }
                for dom, counts in sorted(self.by_domain.items())
            },
            "selection_share": {
                s: round(n / total, 6) for s, n in zip(self.sources, self.selected, strict=True)
            },
            "selected_positions": dict(zip(self.sources, self.selected, strict=True)),
            "no_teacher_positions": self.no_teacher,
            "fallback": self.fallback,
            "fallback_share" if self.fallback == "one_hot_next" else "masked_share": round(
                self.no_teacher / pos, 6
            ),
            "max_fused_width": self.max_width,
        }


# --------------------------------------------------------------------------- join


def join_sources(
    sources: Mapping[str, Mapping[str, AlignedBlock]], split: str | None = "train"
) -> list[tuple[str, list[AlignedBlock]]]:
    """Join the teachers' aligned blocks by content hash.

    Args:
        sources: teacher name -> (block hash -> AlignedBlock), in fusion order (the
            target first when it is its own source, so that it wins ties).
        split: keep only blocks of this split (None: all).

    Returns:
        ``[(hash, [block of each source, in order])]`` sorted by hash, so that the result
        does not depend on the order the records were read in.

    Raises:
        TrainDataError: no sources, a teacher lacks a block another one has, or the
            teachers disagree on a block's target token ids (naming source and block).
    """
    names = list(sources)
    if not names:
        raise TrainDataError("no teachers: fusion needs at least one aligned source")
    keep = {
        n: {h: b for h, b in sources[n].items() if split is None or b.split == split} for n in names
    }
    all_hashes = set().union(*(set(k) for k in keep.values()))
    joined = []
    for h in sorted(all_hashes):
        blocks = []
        for n in names:
            b = keep[n].get(h)
            if b is None:
                other = next(keep[m][h] for m in names if h in keep[m])
                raise TrainDataError(
                    f"teacher '{n}' has no aligned block {other.block_id} (hash {h}) that "
                    f"other teachers have; its align output is incomplete or from another "
                    f"prepare run. Re-run `fuselm align` (with --force if it is stale)"
                )
            blocks.append(b)
        ref = blocks[0]
        for n, b in zip(names[1:], blocks[1:], strict=True):
            if not np.array_equal(np.asarray(b.input_ids), np.asarray(ref.input_ids)):
                raise TrainDataError(
                    f"block {ref.block_id} (hash {h}): teachers '{names[0]}' and '{n}' were "
                    "aligned onto different target token ids; they were aligned for "
                    "different targets or tokenizers. Re-run `fuselm align --force`"
                )
        for n, b in zip(names, blocks, strict=True):
            p = b.n_positions
            if b.ids.shape[0] != p or b.valid.shape[0] != p or b.logprobs.shape != b.ids.shape:
                raise TrainDataError(
                    f"teacher '{n}', block {b.block_id} (hash {h}): {len(b.input_ids)} tokens "
                    f"but teacher arrays of shape ids {b.ids.shape}, valid {b.valid.shape}; "
                    f"expected {p} positions (one per token but the last)"
                )
        joined.append((h, blocks))
    return joined


# --------------------------------------------------------------------------- fuse


@dataclass(frozen=True)
class FusionSpec:
    """How to fuse (``cfg.fuse`` + ``cfg.align.fallback``), decoupled from the config.

    Attributes:
        function: a name of :data:`fuselm.fuse.FUSION_FUNCTIONS`.
        level: ``sequence`` (per block, whole-block per-byte CE) or ``token``.
        fallback: ``one_hot_next`` or ``mask`` for positions without a teacher.
        max_k: keep at most this many fused entries per position (0 = all).
        avg_weighting: AvgCE weighting (``softmax`` or ``inverse``).
        avg_temperature: AvgCE softmax temperature in nats per byte.
    """

    function: str = "min_ce"
    level: str = "sequence"
    fallback: str = "one_hot_next"
    max_k: int = 0
    avg_weighting: str = "softmax"
    avg_temperature: float = 0.1

    def __post_init__(self) -> None:
        get_fusion(self.function)  # raises on an unknown name
        if self.level not in ("sequence", "token"):
            raise TrainDataError(f"fuse level must be sequence or token, got {self.level!r}")
        if self.fallback not in FALLBACKS:
            raise TrainDataError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.max_k < 0:
            raise TrainDataError(f"max_k must be >= 0 (0 = no cap), got {self.max_k}")


@dataclass
class FusedBlock:
    """One block's fused teacher (``P = T - 1`` positions)."""

    input_ids: np.ndarray  # (T,) int64
    ids: np.ndarray  # (P, K) int32, -1 padded
    logprobs: np.ndarray  # (P, K) float32, -inf padded
    selected: np.ndarray  # (S,) int64 positions won per source
    no_teacher: int  # positions without any teacher
    width: int  # fused width before the cap


def fuse_block(
    blocks: Sequence[AlignedBlock], names: Sequence[str], spec: FusionSpec
) -> FusedBlock:
    """Fuse the teachers of one block and apply the fallback.

    Args:
        blocks: the block as aligned for each teacher (same ``input_ids``).
        names: teacher names (for error messages).
        spec: fusion rule, level, fallback and cap.

    Returns:
        The fused teacher rows of the block.

    Raises:
        TrainDataError: NaN in a teacher's inputs (naming teacher and block).
    """
    ref = blocks[0]
    input_ids = np.asarray(ref.input_ids, dtype=np.int64)
    p = ref.n_positions
    if p == 0:
        return FusedBlock(
            input_ids,
            np.full((0, 1), -1, np.int32),
            np.full((0, 1), -np.inf, np.float32),
            np.zeros(len(blocks), np.int64),
            0,
            0,
        )
    ids = stack_sources([torch.from_numpy(np.asarray(b.ids, np.int64)) for b in blocks], -1)
    lps = stack_sources(
        [torch.from_numpy(np.asarray(b.logprobs, np.float32)) for b in blocks], float("-inf")
    )  # (S, P, K)
    valid = torch.from_numpy(np.stack([np.asarray(b.valid, bool) for b in blocks]))  # (S, P)
    gold = torch.from_numpy(np.stack([np.asarray(b.gold, np.float32) for b in blocks]))
    nbytes = torch.from_numpy(np.stack([np.asarray(b.next_bytes, np.int64) for b in blocks]))
    kwargs: dict[str, Any] = {"level": spec.level, "source_names": list(names)}
    if spec.level == "sequence":
        # The source's CE over ALL its positions of the block: comparing only the aligned
        # positions would favour a source whose hard positions happen not to align.
        kwargs["sequence_ce"] = torch.tensor([b.ce_per_byte() for b in blocks])  # (S,)
    if spec.function == "avg_ce":
        kwargs.update(weighting=spec.avg_weighting, tau=spec.avg_temperature)
    try:
        res = get_fusion(spec.function)(ids, lps, valid, gold, nbytes, **kwargs)
    except ValueError as e:
        raise TrainDataError(f"block {ref.block_id} (hash {ref.hash}): {e}") from None
    out_ids, out_lp, out_valid = res.ids, res.logprobs, res.valid  # (P, K), (P, K), (P,)
    width = int(out_ids.shape[-1])
    no_teacher = int((~out_valid).sum())
    if spec.fallback == "one_hot_next" and no_teacher:
        # Position t predicts token t + 1: its fallback is the one-hot of input_ids[t + 1].
        nxt = torch.from_numpy(input_ids[1:])  # (P,)
        out_ids, out_lp, out_valid = fill_fallback(out_ids, out_lp, out_valid, nxt)
    # mask: rows without a teacher stay all -1 and the loss skips them.
    if spec.max_k and out_ids.shape[-1] > spec.max_k:
        out_ids, out_lp = out_ids[:, : spec.max_k], out_lp[:, : spec.max_k]  # sorted desc
    return FusedBlock(
        input_ids=input_ids,
        ids=out_ids.to(torch.int32).numpy(),
        logprobs=out_lp.to(torch.float32).numpy(),
        selected=res.win_counts().numpy(),
        no_teacher=no_teacher,
        width=width,
    )


# --------------------------------------------------------------------------- rows


def split_rows(
    input_ids: np.ndarray,
    teacher_ids: np.ndarray | None,
    teacher_logprobs: np.ndarray | None,
    seq_len: int,
) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """Cut a block into rows of at most ``seq_len`` tokens, each position trained once.

    Consecutive rows overlap by one token (stride ``seq_len - 1``): the last token of a
    row is the first of the next, so the prediction *of* that token (made by the previous
    position, which sits in the first row) and the prediction *from* it (in the second
    row) are both kept, and every position ``0..T-2`` appears in exactly one row with its
    own teacher row. Later rows start without the block's BOS and without left context.

    Args:
        input_ids: ``(T,)``.
        teacher_ids: ``(T - 1, K)`` or None.
        teacher_logprobs: ``(T - 1, K)`` or None.
        seq_len: maximum row length (>= 2).

    Returns:
        ``[(input_ids (L,), teacher_ids (L-1, K), teacher_logprobs (L-1, K))]``.
    """
    if seq_len < 2:
        raise TrainDataError(f"seq_len must be >= 2 to train on anything, got {seq_len}")
    n = int(input_ids.shape[0])
    if n <= seq_len:
        return [(input_ids, teacher_ids, teacher_logprobs)]
    rows = []
    stride = seq_len - 1
    for start in range(0, n - 1, stride):
        stop = min(start + seq_len, n)
        t_ids = teacher_ids[start : stop - 1] if teacher_ids is not None else None
        t_lp = teacher_logprobs[start : stop - 1] if teacher_logprobs is not None else None
        rows.append((input_ids[start:stop], t_ids, t_lp))
    return rows


@dataclass
class TrainData:
    """Training rows plus what was done to make them."""

    examples: list[TrainExample]
    fusion: FusionStats | None
    blocks: int
    split_blocks: int
    tokens: int

    def stats(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out: dict[str, Any] = {
            "blocks": self.blocks,
            "rows": len(self.examples),
            "split_blocks": self.split_blocks,
            "data_tokens": self.tokens,
        }
        if self.fusion is not None:
            out["fusion"] = self.fusion.as_dict()
        return out


def build_examples(
    joined: Sequence[tuple[str, Sequence[AlignedBlock]]],
    names: Sequence[str],
    spec: FusionSpec | None,
    seq_len: int,
) -> TrainData:
    """Fuse every joined block (unless ``spec`` is None) and cut it into training rows.

    Args:
        joined: output of :func:`join_sources`.
        names: teacher names, in the order of each entry's block list.
        spec: how to fuse; None builds CLM-only rows (the control: the same blocks and
            rows, no teacher).
        seq_len: maximum row length; longer blocks are split (:func:`split_rows`).

    Returns:
        The rows, in the order of ``joined``, and fusion statistics.
    """
    examples: list[TrainExample] = []
    fusion = None
    if spec is not None:
        fusion = FusionStats(sources=list(names), selected=[0] * len(names), fallback=spec.fallback)
    split = tokens = 0
    for h, blocks in joined:
        ref = blocks[0]
        if ref.n_positions == 0:
            continue  # a one-token block predicts nothing
        if spec is None:
            input_ids = np.asarray(ref.input_ids, dtype=np.int64)
            t_ids = t_lp = None
        else:
            fb = fuse_block(blocks, names, spec)
            input_ids, t_ids, t_lp = fb.input_ids, fb.ids, fb.logprobs
            assert fusion is not None
            fusion.blocks += 1
            fusion.positions += ref.n_positions
            fusion.selected = [
                a + int(b) for a, b in zip(fusion.selected, fb.selected, strict=True)
            ]
            dom = fusion.by_domain.setdefault(ref.domain, [0] * len(fusion.sources))
            fusion.by_domain[ref.domain] = [
                a + int(b) for a, b in zip(dom, fb.selected, strict=True)
            ]
            fusion.no_teacher += fb.no_teacher
            fusion.max_width = max(fusion.max_width, fb.width)
        mask = None if ref.target_mask is None else np.asarray(ref.target_mask, bool)
        if mask is not None and t_ids is not None:
            # Chat: prompt positions get no teacher (nor the one-hot fallback).
            t_ids, t_lp = t_ids.copy(), t_lp.copy()
            t_ids[~mask] = -1
            t_lp[~mask] = -np.inf
        rows = split_rows(input_ids, t_ids, t_lp, seq_len)
        split += len(rows) > 1
        tokens += int(input_ids.shape[0])
        stride = max(seq_len - 1, 1)
        for part, (ids, ti, tl) in enumerate(rows):
            m = None if mask is None else mask[part * stride : part * stride + len(ids) - 1]
            examples.append(TrainExample(h, ref.block_id, part, ids, ti, tl, m))
    blocks_used = sum(1 for _, b in joined if b[0].n_positions > 0)
    return TrainData(examples, fusion, blocks_used, split, tokens)
