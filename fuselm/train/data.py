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
from fuselm.fuse import blend_with_gold, fill_fallback, get_fusion, stack_sources

FALLBACKS = ("one_hot_next", "mask")
POSITIONS = ("all", "one_to_one")
GATES = ("none", "teacher_better", "advantage")
# ``TrainExample.teacher_source`` codes besides a teacher's index.
NO_TEACHER = -1  # fallback one-hot, masked, or no target
GOLD = -2  # the gate gave the position the gold one-hot instead of its teacher


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
        teacher_tail: ``(L - 1,)`` float32 log of the fused teacher's mass outside
            ``teacher_ids`` (-inf where it has none, e.g. a one-hot fallback).
        teacher_source: ``(L - 1,)`` int16 the teacher that led each position (index in
            fusion order), ``NO_TEACHER`` or ``GOLD`` (for the per-step diagnostics).
    """

    hash: str
    block_id: str
    part: int
    input_ids: np.ndarray
    teacher_ids: np.ndarray | None = None
    teacher_logprobs: np.ndarray | None = None
    target_mask: np.ndarray | None = None
    teacher_tail: np.ndarray | None = None
    teacher_source: np.ndarray | None = None

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
    diagnostics: dict[str, list[float]] = field(default_factory=dict)

    def add(self, other: FusionStats) -> None:
        """Add another part's counts (another block, shard or process) into these."""
        self.blocks += other.blocks
        self.positions += other.positions
        self.selected = [a + b for a, b in zip(self.selected, other.selected, strict=True)]
        self.no_teacher += other.no_teacher
        self.max_width = max(self.max_width, other.max_width)
        for dom, counts in other.by_domain.items():
            cur = self.by_domain.setdefault(dom, [0] * len(self.sources))
            self.by_domain[dom] = [a + b for a, b in zip(cur, counts, strict=True)]
        for dom, sums in other.diagnostics.items():
            cur = self.diagnostics.setdefault(dom, [0.0] * len(DIAGNOSTICS))
            self.diagnostics[dom] = [a + b for a, b in zip(cur, sums, strict=True)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures with shares."""
        total = max(sum(self.selected), 1)
        pos = max(self.positions, 1)
        return {
            "diagnostics_by_domain": {
                dom: domain_diagnostics(sums) for dom, sums in sorted(self.diagnostics.items())
            },
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


# Sums kept per domain while fusing (``FusionStats.diagnostics``), in this order.
DIAGNOSTICS = (
    "positions",  # target positions fused
    "bytes",  # bytes of text the blocks' predictions cover (weight of the per-byte CEs)
    "teacher_nll",  # fused teacher's per-byte CE x bytes (the weighted sources' CE)
    "target_nll",  # the target's own per-byte CE x bytes (when it is a source)
    "target_bytes",  # bytes of the blocks where the target's CE is known
    "gold_outside",  # positions whose gold next token is not among the fused ids
    "tail_mass",  # sum of the fused tail mass over positions with a teacher
    "gated",  # positions the gate gave the gold one-hot
)


def domain_diagnostics(sums: Sequence[float]) -> dict[str, float | None]:
    """Per-domain fusion diagnostics (shares and bits per byte) from ``DIAGNOSTICS`` sums.

    What a user needs to tell whether the teachers know anything the target does not:
    the fused teacher's cross-entropy on the training text against the target's own (both
    in bits per byte), how often the gold token is outside the teacher's ids (a
    renormalised top-k then gives it probability 0), the mass kept in the tail, and how
    many positions the gate handed to plain CLM.
    """
    d = dict(zip(DIAGNOSTICS, sums, strict=True))
    pos = max(d["positions"], 1.0)
    ln2 = float(np.log(2.0))

    def bpb(nll: float, nbytes: float) -> float | None:
        return round(nll / nbytes / ln2, 6) if nbytes > 0 else None

    return {
        "positions": int(d["positions"]),
        "teacher_bits_per_byte": bpb(d["teacher_nll"], d["bytes"]),
        "target_bits_per_byte": bpb(d["target_nll"], d["target_bytes"]),
        "gold_outside_share": round(d["gold_outside"] / pos, 6),
        "tail_mass": round(d["tail_mass"] / pos, 6),
        "gated_share": round(d["gated"] / pos, 6),
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
        max_k: keep at most this many fused entries per position (0 = all); the mass cut
            off joins the fused tail.
        avg_weighting: AvgCE weighting (``softmax`` or ``inverse``).
        avg_temperature: AvgCE softmax temperature in nats per byte.
        positions: ``all``, or ``one_to_one``: a teacher counts only where its next token
            covers exactly the target's next token (elsewhere it is treated as absent).
        gate: ``none``; ``teacher_better``: positions whose fused teacher is not better
            (lower per-byte CE) than the target itself get the gold one-hot (plain CLM);
            ``advantage``: the teacher's share is ``clip(advantage / gate_scale, 0, 1)``
            and the gold one-hot takes the rest.
        gate_scale: nats per byte of advantage at which the teacher gets its full share.
        target: the target's name among the teachers (its own CE is what the gate
            compares with); "" when the target is not a source.
    """

    function: str = "min_ce"
    level: str = "sequence"
    fallback: str = "one_hot_next"
    max_k: int = 0
    avg_weighting: str = "softmax"
    avg_temperature: float = 0.1
    positions: str = "all"
    gate: str = "none"
    gate_scale: float = 0.1
    target: str = ""

    def __post_init__(self) -> None:
        get_fusion(self.function)  # raises on an unknown name
        if self.level not in ("sequence", "token"):
            raise TrainDataError(f"fuse level must be sequence or token, got {self.level!r}")
        if self.fallback not in FALLBACKS:
            raise TrainDataError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.max_k < 0:
            raise TrainDataError(f"max_k must be >= 0 (0 = no cap), got {self.max_k}")
        if self.positions not in POSITIONS:
            raise TrainDataError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.gate not in GATES:
            raise TrainDataError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.gate != "none" and not self.target:
            raise TrainDataError(
                f"fuse.gate: {self.gate} compares each teacher with the target's own "
                "cross-entropy, which needs the target as a source; set target.as_source: "
                "true or fuse.gate: none"
            )
        if not self.gate_scale > 0:
            raise TrainDataError(f"gate_scale must be > 0 (nats per byte), got {self.gate_scale}")


@dataclass
class FusedBlock:
    """One block's fused teacher (``P = T - 1`` positions)."""

    input_ids: np.ndarray  # (T,) int64
    ids: np.ndarray  # (P, K) int32, -1 padded
    logprobs: np.ndarray  # (P, K) float32, -inf padded
    tail_logmass: np.ndarray  # (P,) float32 log of the mass outside ids, -inf if none
    source: np.ndarray  # (P,) int16 leading teacher, NO_TEACHER or GOLD
    selected: np.ndarray  # (S,) int64 positions won per source
    no_teacher: int  # positions without any teacher
    width: int  # fused width before the cap
    diagnostics: list[float]  # this block's DIAGNOSTICS sums


def _stack(blocks: Sequence[AlignedBlock], field_name: str, dtype: Any) -> torch.Tensor:
    """``(S, P)`` tensor of one per-position field of every teacher's record."""
    return torch.from_numpy(np.stack([np.asarray(getattr(b, field_name), dtype) for b in blocks]))


def fuse_block(
    blocks: Sequence[AlignedBlock], names: Sequence[str], spec: FusionSpec
) -> FusedBlock:
    """Fuse the teachers of one block, apply the fallback, then the gate.

    Args:
        blocks: the block as aligned for each teacher (same ``input_ids``).
        names: teacher names (for error messages, and to find ``spec.target``).
        spec: fusion rule, level, fallback, cap, positions and gate.

    Returns:
        The fused teacher rows of the block, with their tail and diagnostics.

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
            np.zeros(0, np.float32),
            np.zeros(0, np.int16),
            np.zeros(len(blocks), np.int64),
            0,
            0,
            [0.0] * len(DIAGNOSTICS),
        )
    ids = stack_sources([torch.from_numpy(np.asarray(b.ids, np.int64)) for b in blocks], -1)
    lps = stack_sources(
        [torch.from_numpy(np.asarray(b.logprobs, np.float32)) for b in blocks], float("-inf")
    )  # (S, P, K)
    valid = _stack(blocks, "valid", bool)  # (S, P)
    if spec.positions == "one_to_one":
        valid = valid & _stack(blocks, "one_to_one", bool)
    kwargs: dict[str, Any] = {
        "level": spec.level,
        "source_names": list(names),
        "max_k": spec.max_k or None,
        "tail_logmass": _stack(blocks, "tail_logmass", np.float32),
    }
    block_ce = torch.tensor([b.ce_per_byte() for b in blocks])  # (S,)
    if spec.level == "sequence":
        # The source's CE over ALL its positions of the block: comparing only the aligned
        # positions would favour a source whose hard positions happen not to align.
        kwargs["sequence_ce"] = block_ce
    if spec.function == "avg_ce":
        kwargs.update(weighting=spec.avg_weighting, tau=spec.avg_temperature)
    gold, nbytes = _stack(blocks, "gold", np.float32), _stack(blocks, "next_bytes", np.int64)
    try:
        res = get_fusion(spec.function)(ids, lps, valid, gold, nbytes, **kwargs)
    except ValueError as e:
        raise TrainDataError(f"block {ref.block_id} (hash {ref.hash}): {e}") from None
    out_ids, out_lp, out_valid, tail = res.ids, res.logprobs, res.valid, res.tail_logmass
    width = int(out_ids.shape[-1])
    no_teacher = int((~out_valid).sum())
    source = torch.where(out_valid, res.selected, NO_TEACHER)  # (P,)
    nxt = torch.from_numpy(input_ids[1:])  # (P,) position t predicts token t + 1
    teacher_ce = _teacher_ce(res, block_ce, spec.level)  # (P,) nats/byte, inf if none
    if spec.fallback == "one_hot_next" and no_teacher:
        out_ids, out_lp, out_valid, tail = fill_fallback(out_ids, out_lp, out_valid, nxt, tail)
    # mask: rows without a teacher stay all -1 and the loss skips them.
    target_at = names.index(spec.target) if spec.target in names else None
    gated = torch.zeros(p, dtype=torch.bool)
    if spec.gate != "none":
        own = res.ce[target_at] if spec.level == "token" else block_ce[target_at]
        advantage = own - teacher_ce  # (P,) nats per byte; > 0 where the teacher is better
        if spec.gate == "teacher_better":
            weight = (advantage > 0).to(torch.float32)
        else:
            weight = (advantage / spec.gate_scale).clamp(0.0, 1.0)
        weight = torch.where(source >= 0, weight.nan_to_num(0.0), 1.0)  # fallback rows stay
        out_ids, out_lp, tail = blend_with_gold(out_ids, out_lp, tail, weight, nxt)
        gated = weight == 0
        source = torch.where(gated, GOLD, source)
    diag = _block_diagnostics(blocks, target_at, teacher_ce, out_ids, out_valid, tail, nxt, gated)
    return FusedBlock(
        input_ids=input_ids,
        ids=out_ids.to(torch.int32).numpy(),
        logprobs=out_lp.to(torch.float32).numpy(),
        tail_logmass=tail.to(torch.float32).numpy(),
        source=source.to(torch.int16).numpy(),
        selected=res.win_counts().numpy(),
        no_teacher=no_teacher,
        width=width,
        diagnostics=diag,
    )


def _teacher_ce(res: Any, block_ce: torch.Tensor, level: str) -> torch.Tensor:
    """Per position, the fused teacher's per-byte CE: the weights' mean of the sources' CEs.

    MinCE: the chosen source's CE; AvgCE: the weighted mean (an upper bound of the mixture's
    own CE). +inf where no source is usable.
    """
    ce = res.ce if level == "token" else block_ce.unsqueeze(-1).expand_as(res.weights)  # (S, P)
    ce = torch.where(res.weights > 0, ce.to(torch.float32), 0.0)
    return torch.where(res.valid, (res.weights * ce).sum(0), float("inf"))


def _block_diagnostics(
    blocks: Sequence[AlignedBlock],
    target_at: int | None,
    teacher_ce: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    tail: torch.Tensor,
    nxt: torch.Tensor,
    gated: torch.Tensor,
) -> list[float]:
    """One block's ``DIAGNOSTICS`` sums (see :func:`domain_diagnostics`)."""
    nbytes = float(blocks[target_at if target_at is not None else 0].nll_bytes)
    have = torch.isfinite(teacher_ce)
    teacher_nll = float(teacher_ce[have].mean()) * nbytes if bool(have.any()) else 0.0
    target_nll = target_bytes = 0.0
    if target_at is not None and blocks[target_at].nll_bytes > 0:
        target_nll, target_bytes = float(blocks[target_at].nll_sum), nbytes
    gold_in = ((ids == nxt.unsqueeze(-1)) & (ids >= 0)).any(-1)  # (P,)
    return [
        float(len(nxt)),
        nbytes if bool(have.any()) else 0.0,
        teacher_nll,
        target_nll,
        target_bytes,
        float((valid & ~gold_in).sum()),
        float(torch.where(valid, tail.exp(), 0.0).sum()),
        float(gated.sum()),
    ]


# --------------------------------------------------------------------------- rows


def split_rows(
    input_ids: np.ndarray,
    per_position: Sequence[np.ndarray | None],
    seq_len: int,
) -> list[tuple[np.ndarray, list[np.ndarray | None]]]:
    """Cut a block into rows of at most ``seq_len`` tokens, each position trained once.

    Consecutive rows overlap by one token (stride ``seq_len - 1``): the last token of a
    row is the first of the next, so the prediction *of* that token (made by the previous
    position, which sits in the first row) and the prediction *from* it (in the second
    row) are both kept, and every position ``0..T-2`` appears in exactly one row with its
    own teacher row. Later rows start without the block's BOS and without left context.

    Args:
        input_ids: ``(T,)``.
        per_position: arrays with one entry per position (``T - 1`` rows: teacher ids,
            log-probs, tail, ...), or None; each is cut like the positions.
        seq_len: maximum row length (>= 2).

    Returns:
        ``[(input_ids (L,), [each array's L - 1 rows, or None])]``.
    """
    if seq_len < 2:
        raise TrainDataError(f"seq_len must be >= 2 to train on anything, got {seq_len}")
    n = int(input_ids.shape[0])
    if n <= seq_len:
        return [(input_ids, list(per_position))]
    rows = []
    stride = seq_len - 1
    for start in range(0, n - 1, stride):
        stop = min(start + seq_len, n)
        parts = [a[start : stop - 1] if a is not None else None for a in per_position]
        rows.append((input_ids[start:stop], parts))
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
        teacher: list[np.ndarray | None] = [None] * 4  # ids, logprobs, tail, source
        input_ids = np.asarray(ref.input_ids, dtype=np.int64)
        if spec is not None:
            fb = fuse_block(blocks, names, spec)
            teacher = [fb.ids, fb.logprobs, fb.tail_logmass, fb.source]
            assert fusion is not None
            fusion.add(_block_stats(fusion.sources, ref, fb))
        mask = None if ref.target_mask is None else np.asarray(ref.target_mask, bool)
        if mask is not None and spec is not None:
            # Chat: prompt positions get no teacher (nor the one-hot fallback).
            teacher = [a.copy() for a in teacher]  # type: ignore[union-attr]
            for a, empty in zip(teacher, (-1, -np.inf, -np.inf, NO_TEACHER), strict=True):
                a[~mask] = empty  # type: ignore[index]
        rows = split_rows(input_ids, [*teacher, mask], seq_len)
        split += len(rows) > 1
        tokens += int(input_ids.shape[0])
        for part, (ids, (ti, tl, tt, ts, m)) in enumerate(rows):
            examples.append(TrainExample(h, ref.block_id, part, ids, ti, tl, m, tt, ts))
    blocks_used = sum(1 for _, b in joined if b[0].n_positions > 0)
    return TrainData(examples, fusion, blocks_used, split, tokens)


def _block_stats(sources: list[str], ref: AlignedBlock, fb: FusedBlock) -> FusionStats:
    """One fused block's contribution to the training set's :class:`FusionStats`."""
    selected = [int(x) for x in fb.selected]
    return FusionStats(
        sources=sources,
        blocks=1,
        positions=ref.n_positions,
        selected=selected,
        no_teacher=fb.no_teacher,
        max_width=fb.width,
        by_domain={ref.domain: selected},
        diagnostics={ref.domain: list(fb.diagnostics)},
    )
