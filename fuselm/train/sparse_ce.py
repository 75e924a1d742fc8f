"""The sparse kernels behind :mod:`fuselm.train.losses`, and the teacher target they use.

Two custom autograd functions, each computing what it needs from ``logsumexp`` and a
gather and writing its closed-form gradient straight into one ``(B, T, V)`` buffer, chunk
by chunk over T: no log-softmax and no dense teacher are ever materialised.

- :class:`SparseTargetCE`: ``sum_k q_k · -log p_k`` for the paper's renormalised top-k
  target (student tempered over the full vocabulary), and the CLM NLL.
- :class:`CoarseLogProbs`: the student's log-probabilities of the teacher's ids and of
  everything else (the tail bucket), and the CLM NLL; the tail-bucket loss at any
  temperature is then ordinary autograd on ``(B, T, K + 1)`` tensors
  (:meth:`FusionTarget.coarse_loss`).

Split from ``losses.py`` so that the public loss definitions stay readable top to bottom
and the memory-critical kernels can be read (and tested) on their own.
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


def clm_targets(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(mask, next_ids)``, both ``(B, T)``: the shifted mask and the next token (0 if none)."""
    mask = shifted_target_mask(labels, ignore_index)
    next_ids = torch.zeros_like(labels, dtype=torch.long)
    next_ids[:, :-1] = labels[:, 1:]
    return mask, torch.where(mask, next_ids, 0)  # ignore_index is not a valid gather index


@dataclass(frozen=True)
class FusionTarget:
    """The sparse teacher target of the fusion term, cleaned and normalised (no grad).

    Two kinds (``tail_bucket``):

    - renormalised (the paper): ``q`` is the teacher over its ids only, tempered and
      renormalised to 1; the student is ``softmax(z / temp)`` over the full vocabulary.
    - tail bucket: the teacher keeps its true probabilities, and the mass outside its ids
      is one more category, ``rest``. The student is coarse-grained onto the same K + 1
      categories (its probability of each id, and its total mass outside them); the
      temperature then acts on these categories, for teacher and student alike:
      ``q_T(c) ∝ q(c)^(1/T)``, ``p_T(c) ∝ p(c)^(1/T)``. This is the only tempering that
      the stored top-k determines (the tempered mass of the tokens the teacher did not
      store, ``sum p(v)^(1/T)``, is unknown); at T = 1 it is exactly the teacher's and
      the student's distributions compared on the partition the teacher sent, and a
      student equal to the teacher has zero loss at every T.

    Attributes:
        ids: ``(B, T, K)`` int64, padding clamped to 0 (``entry`` says which are real).
        entry: ``(B, T, K)`` bool, real entries at positions that count.
        q: ``(B, T, K)`` target probabilities, 0 off ``entry`` (renormalised kind: the
            tempered, renormalised top-k; tail kind: the true probabilities).
        log_q: ``(B, T, K)`` their logs, 0 off ``entry``.
        log_q_rest: ``(B, T)`` tail kind only: log of the teacher's mass outside its ids
            (-inf where it has none); None for the renormalised kind.
        mask: ``(B, T)`` positions that count.
    """

    ids: Tensor
    entry: Tensor
    q: Tensor
    log_q: Tensor
    log_q_rest: Tensor | None
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
    ) -> FusionTarget:
        """The target of one batch from the collated teacher tensors (see the attributes)."""
        # The teacher is a fixed target: no gradient may reach it (it is data, not a model).
        t_lp = teacher_logprobs.detach().float()  # (B, T, K)
        entry = (teacher_ids >= 0) & torch.isfinite(t_lp)  # real, non-zero entries
        mask = shifted_target_mask(labels, ignore_index) & entry.any(-1)  # (B, T)
        entry = entry & mask.unsqueeze(-1)
        # Replace everything outside real entries *before* any arithmetic, so that garbage
        # (or NaN) in padding or at masked positions cannot leak into values or gradients.
        t_lp = torch.where(entry, t_lp, float("-inf"))
        log_rest = None
        if tail_bucket:
            log_q = t_lp  # true probabilities; tempering happens on the coarse categories
            if teacher_tail_logmass is not None:
                log_rest = teacher_tail_logmass.detach().float()
            else:  # rebuilt from the entries: 0 when K = |V|
                log_rest = (1.0 - t_lp.exp().sum(-1)).clamp_min(0.0).log()
            log_rest = torch.where(mask, log_rest.clamp_max(0.0), float("-inf"))
        else:
            scaled = t_lp / temperature if temperature != 1.0 else t_lp
            log_q = torch.log_softmax(scaled, dim=-1)  # renormalised over the top-k
        log_q = torch.where(entry, log_q, 0.0)  # rows without entries were NaN
        q = torch.where(entry, log_q.exp(), 0.0)  # (B, T, K)
        ids = teacher_ids.long().clamp_min(0)
        return cls(ids=ids, entry=entry, q=q, log_q=log_q, log_q_rest=log_rest, mask=mask)

    def coarse_loss(self, coarse: Tensor, temperature: float, kind: FusionKind) -> Tensor:
        """Tail kind: per-position loss between the coarse student and the teacher.

        Args:
            coarse: ``(B, T, K + 1)`` the student's log-probabilities of the ids and of
                the rest (:class:`CoarseLogProbs`), at temperature 1.
            temperature: acts on the K + 1 categories (see the class docstring).
            kind: ``ce`` (soft cross-entropy) or ``kl`` (forward KL, teacher ‖ student).

        Returns:
            ``(B, T)`` loss per position (0 where ``mask`` is False), differentiable
            in ``coarse``.
        """
        assert self.log_q_rest is not None
        rest_col = torch.ones_like(self.mask).unsqueeze(-1)  # the student always has a rest
        student_ok = torch.cat([self.entry, rest_col], -1)  # (B, T, K + 1)
        s = torch.where(student_ok, coarse / temperature, float("-inf"))
        log_p = s - s.logsumexp(-1, keepdim=True)  # (B, T, K + 1) tempered, normalised
        log_q = torch.cat([torch.where(self.entry, self.log_q, float("-inf")),
                           self.log_q_rest.unsqueeze(-1)], -1)  # fmt: skip
        teacher_ok = torch.isfinite(log_q) & self.mask.unsqueeze(-1)
        u = torch.where(teacher_ok, log_q / temperature, float("-inf"))
        log_q_t = u - u.logsumexp(-1, keepdim=True).nan_to_num(0.0)  # rows of -inf stay -inf
        q_t = torch.where(teacher_ok, log_q_t.exp(), 0.0)
        per_pos = -torch.where(teacher_ok, q_t * log_p, 0.0).sum(-1)
        if kind == "kl":  # KL = CE - H(q_T); H(q_T) is a constant of the teacher
            per_pos = per_pos + torch.where(teacher_ok, q_t * log_q_t, 0.0).sum(-1)
        return torch.where(self.mask, per_pos, 0.0)

    def reduce(self, per_pos: Tensor, kind: FusionKind) -> tuple[Tensor, Tensor]:
        """Renormalised kind: sum of the per-position loss over the mask, and its count."""
        if kind == "kl":  # KL = CE - H(q); H(q) is a constant of the teacher
            per_pos = per_pos + (self.q * self.log_q).sum(-1)
        # where, not multiply: logits at masked positions may be anything.
        per_pos = torch.where(self.mask, per_pos, 0.0)
        return per_pos.sum(), self.mask.sum()

    def gold_diagnostics(
        self, next_ids: Tensor, nll: Tensor, tail_logmass: Tensor | None
    ) -> dict[str, Tensor]:
        """Sums of what the target teaches about the gold next token (detached).

        ``teacher_gold_nll`` and ``student_gold_nll`` are summed over the positions whose
        gold token is among the teacher's ids (``gold_inside`` of them): how much the
        target's probability of the gold beats (or trails) the student's current one.
        ``gold_outside`` counts the positions whose gold is not among the ids (the
        renormalised target gives it probability 0); ``tail_mass`` sums the teacher's mass
        outside its ids (``tail_logmass``, as stored; what renormalisation inflates away).
        """
        hit = self.entry & (self.ids == next_ids.unsqueeze(-1))  # (B, T, K)
        inside = hit.any(-1) & self.mask
        q_gold = torch.where(hit, self.q, 0.0).sum(-1)
        if self.log_q_rest is not None:
            q_gold = q_gold / (self.q.sum(-1) + self.log_q_rest.exp()).clamp_min(1e-30)
        with torch.no_grad():
            rest = torch.zeros_like(q_gold) if tail_logmass is None else tail_logmass.exp()
            return {
                "gold_inside": inside.sum().float(),
                "teacher_gold_nll": torch.where(inside, -q_gold.clamp_min(1e-30).log(), 0.0).sum(),
                "student_gold_nll": torch.where(inside, nll.detach().float(), 0.0).sum(),
                "gold_outside": (self.mask & ~inside).sum().float(),
                "tail_mass": torch.where(self.mask, rest, 0.0).sum(),
            }


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


class SparseTargetCE(torch.autograd.Function):
    """Per-position soft cross-entropies of the student against sparse targets.

    Two targets share one pass over the logits ``z (B, T, V)``:

    - fusion (renormalised kind): ``ce_t = -sum_k q_tk log p_t(ids_tk)`` with
      ``p = softmax(z / temp)``;
    - CLM: ``nll_t = -log softmax(z_t)[next_ids_t]``.

    Gradient (per position, ``Q = sum_k q_k``)::

        d ce / d z_v  = (p_v · Q - q_v) / temp           for v in ids
                      = p_v · Q / temp                   otherwise
        d nll / d z_v = softmax(z)_v - [v == next_id]

    Written chunk by chunk into one ``(B, T, V)`` buffer.
    """

    @staticmethod
    def forward(  # noqa: D102 (the class docstring is the contract)
        ctx: Any,
        logits: Tensor,  # (B, T, V)
        ids: Tensor | None,  # (B, T, K) int64 >= 0
        entry: Tensor | None,  # (B, T, K) bool
        q: Tensor | None,  # (B, T, K)
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
        for sl in slices:  # only (B, chunk, V) temporaries
            z = logits[:, sl].to(cdt)
            if lse_t is not None:
                zt = z / temperature if temperature != 1.0 else z
                lse_t[:, sl] = zt.logsumexp(-1)
            if lse_1 is not None and lse_1 is not lse_t:
                lse_1[:, sl] = z.logsumexp(-1)

        ce = logits.new_zeros((batch, length), dtype=cdt)
        nll = logits.new_zeros((batch, length), dtype=cdt)
        if use_fusion:
            assert ids is not None and q is not None
            logp = logits.gather(-1, ids).to(cdt) / temperature - lse_t.unsqueeze(-1)  # (B,T,K)
            ce = -(q * logp).sum(-1)  # q is 0 on padding
        if use_clm:
            assert next_ids is not None and lse_1 is not None
            picked = logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1).to(cdt)
            nll = lse_1 - picked
        ctx.save_for_backward(logits, ids, entry, q, lse_t, lse_1, next_ids, clm_mask)
        ctx.temperature, ctx.slices = temperature, slices
        return ce, nll

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor, g_nll: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        logits, ids, entry, q, lse_t, lse_1, next_ids, clm_mask = ctx.saved_tensors
        temp = ctx.temperature
        cdt = torch.promote_types(logits.dtype, torch.float32)
        use_fusion, use_clm = ids is not None, next_ids is not None
        grad = torch.empty_like(logits)  # the one full-size allocation

        if use_fusion:
            a = g_ce.to(cdt) / temp  # (B, T)
            mass = q.sum(-1)
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
                a_c = a[:, sl]
                dense = a_c * mass[:, sl]  # (B, c)
                shared = use_clm and temp == 1.0  # same softmax serves CLM
                if shared:
                    dense = dense + b[:, sl]
                vals = p_ids * dense.unsqueeze(-1) - a_c.unsqueeze(-1) * q_w[:, sl]
                out.mul_(dense.unsqueeze(-1)).scatter_(-1, ids_w[:, sl], vals)
                if use_clm and not shared:
                    p1 = (z - lse_1[:, sl].unsqueeze(-1)).exp_()
                    out.add_(p1.mul_(b[:, sl].unsqueeze(-1)))
            else:
                out = (z - lse_1[:, sl].unsqueeze(-1)).exp_().mul_(b[:, sl].unsqueeze(-1))
            if use_clm:
                out.scatter_add_(-1, next_ids[:, sl].unsqueeze(-1), -b[:, sl].unsqueeze(-1))
            grad[:, sl] = out
        return (grad,) + (None,) * 7


class CoarseLogProbs(torch.autograd.Function):
    """The student's log-probabilities on a sparse target's categories, and its CLM NLL.

    Per position, at temperature 1 and from one log-partition ``lse = logsumexp(z)``:
    ``log p(ids_k) = z[ids_k] - lse`` for the K ids, and ``log P_rest``, the student's mass
    outside them, summed over those tokens (not ``1 - sum p(ids)``: that difference loses
    all precision when the rest is small). Any loss that is a function of these K + 1
    log-probabilities (the tail-bucket target at any temperature) is then computed on small
    ``(B, T, K + 1)`` tensors under autograd, and this function turns its gradient ``g``
    into the logits' gradient without a dense teacher (``S = sum_c g_c``)::

        d / d z_v = g_k - p_v · S                  v = ids_k
                  = p_v · (g_rest / P_rest - S)    otherwise
        (+ the CLM part softmax(z)_v - [v == next_id], scaled by its gradient)

    written chunk by chunk into one ``(B, T, V)`` buffer. Padding columns of ``ids`` must
    get a zero gradient (their coarse values are meaningless). Not twice differentiable.
    """

    @staticmethod
    def forward(  # noqa: D102 (the class docstring is the contract)
        ctx: Any,
        logits: Tensor,  # (B, T, V)
        ids: Tensor,  # (B, T, K) int64 >= 0
        entry: Tensor,  # (B, T, K) bool
        next_ids: Tensor | None,  # (B, T) int64 >= 0
        clm_mask: Tensor | None,  # (B, T) bool
        chunk_size: int | None,
    ) -> tuple[Tensor, Tensor]:
        cdt = torch.promote_types(logits.dtype, torch.float32)
        batch, length, _ = logits.shape
        slices = _chunks(logits, chunk_size)
        ids_w = _anchor_padding(ids, entry)
        lse = logits.new_empty((batch, length), dtype=cdt)
        log_rest = logits.new_empty((batch, length), dtype=cdt)
        for sl in slices:  # only (B, chunk, V) temporaries
            z = logits[:, sl].to(cdt)
            lse[:, sl] = z.logsumexp(-1)
            outside = z.scatter(-1, ids_w[:, sl], float("-inf"))
            log_rest[:, sl] = (outside.logsumexp(-1) - lse[:, sl]).clamp_min(_MIN_LOG_TAIL)
        coarse = torch.cat(
            [logits.gather(-1, ids_w).to(cdt) - lse.unsqueeze(-1), log_rest.unsqueeze(-1)], -1
        )  # (B, T, K + 1)
        nll = logits.new_zeros((batch, length), dtype=cdt)
        if next_ids is not None:
            nll = lse - logits.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1).to(cdt)
        ctx.save_for_backward(logits, ids_w, entry, lse, log_rest, next_ids, clm_mask)
        ctx.slices = slices
        return coarse, nll

    @staticmethod
    def backward(ctx: Any, g_coarse: Tensor, g_nll: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        logits, ids_w, entry, lse, log_rest, next_ids, clm_mask = ctx.saved_tensors
        cdt = torch.promote_types(logits.dtype, torch.float32)
        k = ids_w.shape[-1]
        g_ids = torch.where(entry, g_coarse[..., :k].to(cdt), 0.0)  # (B, T, K)
        g_rest = g_coarse[..., k].to(cdt)  # (B, T)
        total = g_ids.sum(-1) + g_rest  # S
        dense = g_rest * (-log_rest).exp() - total  # (B, T); log_rest is floored: finite
        at_ids = -total  # coefficient of p_v at the ids
        use_clm = next_ids is not None
        if use_clm:
            b = torch.where(clm_mask, g_nll.to(cdt), 0.0)  # (B, T)
            dense, at_ids = dense + b, at_ids + b
        g_w = _anchor_padding(g_ids, entry)
        grad = torch.empty_like(logits)  # the one full-size allocation
        for sl in ctx.slices:
            out = (logits[:, sl].to(cdt) - lse[:, sl].unsqueeze(-1)).exp_()  # (B, c, V) p
            p_ids = out.gather(-1, ids_w[:, sl])  # (B, c, K)
            # Written, not added to the dense term: p_v (g_rest / P_rest) is not the value
            # at the ids, and adding then subtracting it would cancel catastrophically.
            vals = g_w[:, sl] + p_ids * at_ids[:, sl].unsqueeze(-1)
            out.mul_(dense[:, sl].unsqueeze(-1)).scatter_(-1, ids_w[:, sl], vals)
            if use_clm:
                out.scatter_add_(-1, next_ids[:, sl].unsqueeze(-1), -b[:, sl].unsqueeze(-1))
            grad[:, sl] = out
        return (grad,) + (None,) * 5


def check_logits_labels(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    """Refuse logits that are not ``(B, T, V)``, mismatched labels, or labels out of range."""
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


def check_teacher(
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


def check_fusion_options(kind: str, temperature: float) -> None:
    """Refuse an unknown fusion kind or a non-positive temperature."""
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
