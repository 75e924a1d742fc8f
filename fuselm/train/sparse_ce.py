"""The sparse soft-cross-entropy kernel behind :mod:`fuselm.train.losses`.

A custom autograd function computes ``sum_v q_v · -log p_v`` for a sparse target ``q``
(teacher top-k ids and probabilities, optionally a tail bucket) from ``logsumexp`` and a
gather, and writes the closed-form gradient ``(Q · p - q) / temp`` straight into one
``(B, T, V)`` buffer, chunk by chunk over T: no log-softmax and no dense teacher are ever
materialised. Split from ``losses.py`` so that the public loss definitions stay readable
top to bottom and the memory-critical kernel can be read (and tested) on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100

# Default chunk: about 2^22 logits (16 MiB in float32) per temporary.
_CHUNK_ELEMENTS = 1 << 22

# Floor of the log of the student's mass outside the teacher's ids in the tail bucket
# (e^-60 ≈ 1e-26): only there to keep log and 1/mass finite when the ids cover the whole
# vocabulary; the gradient stays bounded by the teacher's tail mass either way.
_MIN_LOG_TAIL = -60.0

FusionKind = Literal["ce", "kl"]


def shifted_target_mask(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Positions that have a next-token target.

    Args:
        labels: ``(B, T)`` label ids, ``ignore_index`` where no loss is wanted.
        ignore_index: the label value that means "no target".

    Returns:
        ``(B, T)`` bool; True at t iff ``t < T - 1`` and ``labels[:, t + 1] != ignore_index``.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def _clm_targets(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(mask, next_ids)``, both ``(B, T)``: the shifted mask and the next token (0 if none)."""
    mask = shifted_target_mask(labels, ignore_index)
    next_ids = torch.zeros_like(labels, dtype=torch.long)
    next_ids[:, :-1] = labels[:, 1:]
    return mask, torch.where(mask, next_ids, 0)  # ignore_index is not a valid gather index


@dataclass(frozen=True)
class _FusionTarget:
    """The sparse teacher target of the fusion term, cleaned and normalised (no grad).

    Attributes:
        ids: ``(B, T, K)`` int64, padding clamped to 0 (``entry`` says which are real).
        entry: ``(B, T, K)`` bool, real entries at positions that count.
        q: ``(B, T, K)`` target probabilities, 0 off ``entry``.
        log_q: ``(B, T, K)`` their logs, 0 off ``entry`` (for the KL's entropy term).
        q_tail: ``(B, T)`` tail-bucket mass (0 where masked) or None.
        mask: ``(B, T)`` positions that count.
    """

    ids: Tensor
    entry: Tensor
    q: Tensor
    log_q: Tensor
    q_tail: Tensor | None
    mask: Tensor

    @classmethod
    def build(
        cls,
        teacher_ids: Tensor,
        teacher_logprobs: Tensor,
        labels: Tensor,
        temperature: float,
        tail_bucket: bool,
        teacher_tail_logmass: Tensor | None,
        ignore_index: int,
    ) -> _FusionTarget:
        # The teacher is a fixed target: no gradient may reach it (it is data, not a model).
        t_lp = teacher_logprobs.detach().float()  # (B, T, K)
        entry = (teacher_ids >= 0) & torch.isfinite(t_lp)  # real, non-zero entries
        mask = shifted_target_mask(labels, ignore_index) & entry.any(-1)  # (B, T)
        entry = entry & mask.unsqueeze(-1)
        # Replace everything outside real entries *before* any arithmetic, so that garbage
        # (or NaN) in padding or at masked positions cannot leak into values or gradients.
        t_lp = torch.where(entry, t_lp, float("-inf"))
        if tail_bucket:
            log_q = t_lp  # true probabilities; temperature == 1 is enforced
        else:
            scaled = t_lp / temperature if temperature != 1.0 else t_lp
            log_q = torch.log_softmax(scaled, dim=-1)  # renormalised over the top-k
        log_q = torch.where(entry, log_q, 0.0)  # rows without entries were NaN
        q = torch.where(entry, log_q.exp(), 0.0)  # (B, T, K)
        q_tail = None
        if tail_bucket:
            if teacher_tail_logmass is not None:
                q_tail = teacher_tail_logmass.detach().float().exp()  # (B, T)
            else:
                q_tail = (1.0 - q.sum(-1)).clamp_min(0.0)  # prob space: 0 when K = |V|
            q_tail = torch.where(mask, q_tail, 0.0)
        ids = teacher_ids.long().clamp_min(0)
        return cls(ids=ids, entry=entry, q=q, log_q=log_q, q_tail=q_tail, mask=mask)

    def reduce(self, ce: Tensor, kind: FusionKind) -> tuple[Tensor, Tensor]:
        """Sum of the per-position loss over the mask, and the number of positions."""
        per_pos = ce  # (B, T) soft cross-entropy
        if kind == "kl":  # KL = CE - H(q); H(q) is a constant of the teacher
            neg_entropy = (self.q * self.log_q).sum(-1)
            if self.q_tail is not None:
                q_t = self.q_tail
                neg_entropy = neg_entropy + torch.where(q_t > 0, q_t * q_t.log(), 0.0)
            per_pos = per_pos + neg_entropy
        # where, not multiply: logits at masked positions may be anything.
        per_pos = torch.where(self.mask, per_pos, 0.0)
        return per_pos.sum(), self.mask.sum()


def _chunks(logits: Tensor, chunk_size: int | None) -> list[slice]:
    """Slices over T so that each chunk holds about ``_CHUNK_ELEMENTS`` logits."""
    batch, length, vocab = logits.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, batch * vocab))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return [slice(s, min(s + chunk_size, length)) for s in range(0, length, chunk_size)]


def _anchor_padding(values: Tensor, entry: Tensor) -> Tensor:
    """Replace padding entries by the row's first real entry.

    ``scatter_`` with repeated indices keeps an arbitrary one of the written values, so a
    padding entry (whose id was clamped to 0) must write exactly what a real entry writes:
    pointing it at the row's first real entry, with that entry's target, makes duplicate
    writes agree. Rows without real entries keep their first column.

    Args:
        values: ``(B, T, K)`` ids or targets.
        entry: ``(B, T, K)`` bool, real entries.

    Returns:
        ``(B, T, K)``.
    """
    first = entry.to(torch.uint8).argmax(-1, keepdim=True)  # (B, T, 1) first True (or 0)
    return torch.where(entry, values, values.gather(-1, first))


class _SparseTargetCE(torch.autograd.Function):
    """Per-position soft cross-entropies of the student against sparse targets.

    Two targets share one pass over the logits ``z (B, T, V)``:

    - fusion: ``ce_t = -sum_k q_tk log p_t(ids_tk) - q_tail_t log P_tail_t`` with
      ``p = softmax(z / temp)`` and ``P_tail`` the student's mass outside the ids;
    - CLM: ``nll_t = -log softmax(z_t)[next_ids_t]``.

    Gradient (per position, ``Q = sum_k q_k + q_tail``, ``r = q_tail / P_tail``)::

        d ce / d z_v  = (p_v · Q - q_v) / temp           for v in ids
                      = p_v · (Q - r) / temp             otherwise
        d nll / d z_v = softmax(z)_v - [v == next_id]

    Written chunk by chunk into one ``(B, T, V)`` buffer. The value at the teacher's ids is
    *written* (not added on top of the dense term), so that ``p_v (Q - r) + p_v r`` never
    cancels catastrophically when the student's tail mass is tiny.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,  # (B, T, V)
        ids: Tensor | None,  # (B, T, K) int64 >= 0
        entry: Tensor | None,  # (B, T, K) bool
        q: Tensor | None,  # (B, T, K)
        q_tail: Tensor | None,  # (B, T)
        temperature: float,
        next_ids: Tensor | None,  # (B, T) int64 >= 0
        clm_mask: Tensor | None,  # (B, T) bool
        chunk_size: int | None,
    ) -> tuple[Tensor, Tensor]:
        cdt = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 input
        batch, length, _ = logits.shape
        use_fusion, use_clm = ids is not None, next_ids is not None
        slices = _chunks(logits, chunk_size)
        lse_t = lse_1 = None
        if use_fusion:
            lse_t = logits.new_empty((batch, length), dtype=cdt)
        if use_clm:
            lse_1 = (
                lse_t
                if (use_fusion and temperature == 1.0)
                else logits.new_empty((batch, length), dtype=cdt)
            )
        log_tail = ids_w = None
        if q_tail is not None:
            assert ids is not None and entry is not None
            ids_w = _anchor_padding(ids, entry)
            log_tail = logits.new_empty((batch, length), dtype=cdt)
        for sl in slices:  # only (B, chunk, V) temporaries
            z = logits[:, sl].to(cdt)
            if lse_t is not None:
                zt = z / temperature if temperature != 1.0 else z
                lse_t[:, sl] = zt.logsumexp(-1)
                if log_tail is not None:
                    # The student's tail mass summed over the tokens outside the ids, not
                    # 1 - sum over the ids: that difference loses all precision when the
                    # tail is small.
                    outside = zt.scatter(-1, ids_w[:, sl], float("-inf"))
                    log_tail[:, sl] = (outside.logsumexp(-1) - lse_t[:, sl]).clamp_min(
                        _MIN_LOG_TAIL
                    )
            if lse_1 is not None and lse_1 is not lse_t:
                lse_1[:, sl] = z.logsumexp(-1)

        ce = logits.new_zeros((batch, length), dtype=cdt)
        nll = logits.new_zeros((batch, length), dtype=cdt)
        if use_fusion:
            assert ids is not None and q is not None
            logp = logits.gather(-1, ids).to(cdt) / temperature - lse_t.unsqueeze(-1)  # (B,T,K)
            ce = -(q * logp).sum(-1)  # q is 0 on padding
            if q_tail is not None:
                ce = ce - q_tail * log_tail
        if use_clm:
            assert next_ids is not None and lse_1 is not None
            picked = logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1).to(cdt)
            nll = lse_1 - picked
        ctx.save_for_backward(
            logits, ids, entry, q, q_tail, lse_t, lse_1, log_tail, next_ids, clm_mask
        )
        ctx.temperature, ctx.slices = temperature, slices
        return ce, nll

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor, g_nll: Tensor) -> tuple[Tensor | None, ...]:
        logits, ids, entry, q, q_tail, lse_t, lse_1, log_tail, next_ids, clm_mask = (
            ctx.saved_tensors
        )
        temp = ctx.temperature
        cdt = torch.promote_types(logits.dtype, torch.float32)
        use_fusion, use_clm = ids is not None, next_ids is not None
        grad = torch.empty_like(logits)  # the one full-size allocation

        if use_fusion:
            a = g_ce.to(cdt) / temp  # (B, T)
            mass = q.sum(-1)
            r = torch.zeros_like(a)
            if q_tail is not None:
                mass = mass + q_tail
                r = q_tail / log_tail.exp()  # (B, T); log_tail is floored, so finite
            ids_w = _anchor_padding(ids, entry)  # (B, T, K)
            q_w = _anchor_padding(q, entry)
        if use_clm:
            b = torch.where(clm_mask, g_nll.to(cdt), 0.0)  # (B, T)
        for sl in ctx.slices:
            z = logits[:, sl].to(cdt)
            if use_fusion:
                zt = z / temp if temp != 1.0 else z
                out = (zt - lse_t[:, sl].unsqueeze(-1)).exp_()  # (B, c, V) p_temp
                p_ids = out.gather(-1, ids_w[:, sl])  # (B, c, K)
                a_c, mass_c = a[:, sl], mass[:, sl]
                dense = a_c * (mass_c - r[:, sl])  # (B, c)
                at_ids = a_c * mass_c
                shared = use_clm and temp == 1.0  # same softmax serves CLM
                if shared:
                    dense = dense + b[:, sl]
                    at_ids = at_ids + b[:, sl]
                vals = p_ids * at_ids.unsqueeze(-1) - a_c.unsqueeze(-1) * q_w[:, sl]
                out.mul_(dense.unsqueeze(-1)).scatter_(-1, ids_w[:, sl], vals)
                if use_clm and not shared:
                    p1 = (z - lse_1[:, sl].unsqueeze(-1)).exp_()
                    out.add_(p1.mul_(b[:, sl].unsqueeze(-1)))
            else:
                out = (z - lse_1[:, sl].unsqueeze(-1)).exp_().mul_(b[:, sl].unsqueeze(-1))
            if use_clm:
                out.scatter_add_(-1, next_ids[:, sl].unsqueeze(-1), -b[:, sl].unsqueeze(-1))
            grad[:, sl] = out
        return (grad,) + (None,) * 8


def _check_logits_labels(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != student_logits (B, T) {tuple(logits.shape[:2])}"
        )
    vocab = logits.shape[-1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"label {int(labels[b, t])} outside [0, {vocab}) and != ignore_index "
            f"{ignore_index} at batch row {b}, position {t}"
        )


def _check_teacher(
    logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor | None,
    labels: Tensor,
    ignore_index: int,
) -> None:
    """Shapes, id range, unique ids per row, no NaN where used (one host sync).

    NaN is only an error on real entries of positions that have a target: padding and
    masked positions may hold anything, they never enter the loss.
    """
    bt = tuple(logits.shape[:2])
    if ids.dim() != 3 or tuple(ids.shape[:2]) != bt:
        raise ValueError(
            f"teacher_ids must be (B, T, K) with (B, T) = {bt}, got {tuple(ids.shape)}"
        )
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"teacher_logprobs shape {tuple(logprobs.shape)} != teacher_ids {tuple(ids.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
    if tail_logmass is not None and tuple(tail_logmass.shape) != bt:
        raise ValueError(f"teacher_tail_logmass must be (B, T) = {bt}")
    vocab = logits.shape[-1]
    out_of_range = (ids < -1) | (ids >= vocab)
    target = shifted_target_mask(labels, ignore_index).unsqueeze(-1)  # (B, T, 1)
    nan = (ids >= 0) & target & logprobs.isnan()
    if tail_logmass is not None:
        nan = nan | (target & tail_logmass.isnan().unsqueeze(-1))
    srt = ids.sort(dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if not (out_of_range.any() | nan.any() | dup.any()):  # the common case: one sync
        return
    for what, bad in (
        (f"teacher id outside [-1, {vocab})", out_of_range.any(-1)),
        ("NaN teacher log-probability", nan.any(-1)),
        ("duplicate teacher id in one row", dup.any(-1)),
    ):
        if bad.any():
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{what} at batch row {b}, position {t}")


def _check_fusion_options(
    kind: str, temperature: float, tail_bucket: bool, tail_logmass: Tensor | None
) -> None:
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail_bucket and temperature != 1.0:
        raise ValueError(
            "tail_bucket needs temperature == 1: the tempered mass of the teacher's unseen "
            "tail cannot be recovered from its top-k; use tail_bucket=False to temper"
        )
    if tail_logmass is not None and not tail_bucket:
        raise ValueError("teacher_tail_logmass is only used with tail_bucket=True")
