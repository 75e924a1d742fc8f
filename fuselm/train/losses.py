"""The continual-training loss of the target: CLM plus a sparse fusion term.

Stage 5 of the method (SPEC §2.5; FuseLLM, arXiv 2401.10491, Eq. 1-3)::

    L = lam · L_CLM + (1 - lam) · L_fusion

``L_CLM`` is the ordinary next-token cross-entropy; ``L_fusion`` compares the student's
next-token distribution with the fused teacher distribution, stored *sparsely* as the
top-k ``(ids, logprobs)`` per position (see :mod:`fuselm.fuse`).

Conventions shared by all functions here (Hugging Face causal-LM convention):

- ``student_logits (B, T, V)``: position t predicts token t+1.
- ``labels (B, T)``: the input ids, with ``ignore_index`` (-100) where no loss is wanted.
  The target of position t is ``labels[:, t + 1]``, so position t has a target only if
  ``t < T - 1`` and ``labels[:, t + 1] != ignore_index`` (the *shifted* mask).
- ``teacher_ids (B, T, K)`` / ``teacher_logprobs (B, T, K)``: the teacher's distribution
  for the token *after* position t, i.e. aligned with ``student_logits[:, t]``; ids padded
  with -1 (log-prob ignored there). Ids must be unique within a row (``fuse`` ensures it).

Memory. A dense ``(B, T, V)`` teacher is never built, and neither is the student's
log-softmax: every term here is a soft cross-entropy against a *sparse* target, whose
value needs only ``logZ = logsumexp(z / temp)`` (``(B, T)``) and the logits gathered at the
target ids, ``log p(v) = z_v / temp - logZ``. The gradient has the closed form
``(Q · p - q) / temp`` (``p`` the student's softmax, ``q`` the sparse target, ``Q`` its
mass), so a custom autograd function writes it directly into one ``(B, T, V)`` buffer, chunk
by chunk over T. Peak memory above the logits is therefore one ``(B, T, V)`` tensor (the
gradient, which backward must produce anyway) plus a few ``(B, chunk, V)`` temporaries,
instead of the three or more full-size tensors of ``log_softmax`` + ``gather`` under
autograd (or of ``F.cross_entropy``). CLM and fusion share the same buffer and the same
log-partition when ``temp == 1``. Not twice differentiable.

The teacher's tail (``tail_bucket=True``). A top-k teacher renormalised to 1 teaches
overconfidence: the student is pushed to put *all* its mass on k tokens, which made
students worse than where they started when used alone (SPEC §6). With the tail bucket the
teacher keeps its true probabilities and its mass outside the ids is one more category;
the student is compared on the same K + 1 categories (:class:`~fuselm.train.sparse_ce.
CoarseLogProbs`), and a temperature acts on those categories for both sides
(:class:`~fuselm.train.sparse_ce.FusionTarget`). ``temperature_squared`` multiplies the
fusion term by T² (Hinton et al. 2015) so that its gradient keeps its size as T changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fuselm.train.sparse_ce import (
    IGNORE_INDEX,
    CoarseLogProbs,
    FusionKind,
    FusionTarget,
    SparseTargetCE,
    check_fusion_options,
    check_logits_labels,
    check_teacher,
    clm_targets,
    shifted_target_mask,
)

__all__ = [
    "IGNORE_INDEX",
    "LossTerms",
    "clm_loss",
    "combined_loss",
    "fusion_loss",
    "loss_terms",
    "shifted_target_mask",
]


def clm_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:
    """Standard shifted next-token cross-entropy, averaged over positions with a target.

    Equal to ``F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())``
    but with the memory profile described in the module docstring.

    Args:
        student_logits: ``(B, T, V)``.
        labels: ``(B, T)``.
        ignore_index: label value without a target.
        chunk_size: positions per chunk of the vocabulary-wide work (default: about 2^22
            logits per chunk).

    Returns:
        Scalar float32 loss (0 with a zero gradient if no position has a target).
    """
    check_logits_labels(student_logits, labels, ignore_index)
    mask, next_ids = clm_targets(labels, ignore_index)
    _, nll = SparseTargetCE.apply(student_logits, None, None, None, 1.0, next_ids, mask, chunk_size)
    return torch.where(mask, nll, 0.0).sum() / mask.sum().clamp_min(1)


@dataclass
class LossTerms:
    """The two terms of the objective, still differentiable, and what they were made of.

    Attributes:
        clm: mean CLM NLL over the shifted target mask (0 when not computed).
        fusion: mean fusion term over the positions with a teacher row (T²-scaled when
            asked; 0 without a teacher).
        clm_tokens: positions of the CLM mean.
        fusion_tokens: positions of the fusion mean.
        diagnostics: detached sums about the gold next token (see
            :meth:`~fuselm.train.sparse_ce.FusionTarget.gold_diagnostics`); empty without
            a teacher or without the CLM term.
    """

    clm: Tensor
    fusion: Tensor
    clm_tokens: Tensor
    fusion_tokens: Tensor
    diagnostics: dict[str, Tensor]


def loss_terms(
    student_logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    *,
    kind: FusionKind = "ce",
    temperature: float = 1.0,
    tail_bucket: bool = False,
    teacher_tail_logmass: Tensor | None = None,
    temperature_squared: bool = False,
    with_clm: bool = True,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> LossTerms:
    """Both terms of the objective from one pass over the logits (see :func:`fusion_loss`).

    Without a teacher only the CLM term is computed. The caller weights the terms (a fixed
    λ, or from their gradient magnitudes, :mod:`fuselm.train.step`).

    Args:
        student_logits: ``(B, T, V)``.
        labels: ``(B, T)``.
        teacher_ids: ``(B, T, K)`` or None (CLM only).
        teacher_logprobs: ``(B, T, K)`` or None.
        kind: ``"ce"`` or ``"kl"``.
        temperature: fusion temperature (the CLM term always uses 1).
        tail_bucket: keep the teacher's tail as one category (see :func:`fusion_loss`).
        teacher_tail_logmass: ``(B, T)`` log of the teacher's mass outside its ids (the
            tail bucket's mass; also reported in the diagnostics).
        temperature_squared: multiply the fusion term by ``temperature ** 2``.
        with_clm: compute the CLM term (and the diagnostics, which need it).
        ignore_index: label value without a target.
        chunk_size: positions per chunk of the vocabulary-wide work.

    Returns:
        The terms.
    """
    check_logits_labels(student_logits, labels, ignore_index)
    mask, next_ids = clm_targets(labels, ignore_index)
    clm_ids, clm_mask = (next_ids, mask) if with_clm else (None, None)
    zero = torch.zeros((), device=student_logits.device)
    if teacher_ids is None or teacher_logprobs is None:
        _, nll = SparseTargetCE.apply(
            student_logits, None, None, None, 1.0, clm_ids, clm_mask, chunk_size
        )
        clm = torch.where(mask, nll, 0.0).sum() / mask.sum().clamp_min(1)
        no = torch.zeros((), dtype=torch.long, device=clm.device)
        return LossTerms(clm if with_clm else zero, zero, mask.sum(), no, {})
    check_fusion_options(kind, temperature)
    check_teacher(
        student_logits, teacher_ids, teacher_logprobs, teacher_tail_logmass, labels, ignore_index
    )
    target = FusionTarget.build(
        teacher_ids,
        teacher_logprobs,
        labels,
        temperature,
        tail_bucket,
        teacher_tail_logmass,
        ignore_index,
    )
    if tail_bucket:
        coarse, nll = CoarseLogProbs.apply(
            student_logits, target.ids, target.entry, clm_ids, clm_mask, chunk_size
        )
        fus_total, fus_count = (
            target.coarse_loss(coarse, temperature, kind).sum(),
            target.mask.sum(),
        )
    else:
        ce, nll = SparseTargetCE.apply(
            student_logits,
            target.ids,
            target.entry,
            target.q,
            temperature,
            clm_ids,
            clm_mask,
            chunk_size,
        )
        fus_total, fus_count = target.reduce(ce, kind)
    scale = temperature**2 if temperature_squared else 1.0
    fusion = scale * fus_total / fus_count.clamp_min(1)
    if not with_clm:
        return LossTerms(zero, fusion, mask.sum(), fus_count, {})
    clm = torch.where(mask, nll, 0.0).sum() / mask.sum().clamp_min(1)
    diag = target.gold_diagnostics(next_ids, nll, teacher_tail_logmass)
    return LossTerms(clm, fusion, mask.sum(), fus_count, diag)


def fusion_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    *,
    kind: FusionKind = "ce",
    temperature: float = 1.0,
    tail_bucket: bool = False,
    teacher_tail_logmass: Tensor | None = None,
    temperature_squared: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sparse soft cross-entropy or forward KL between the fused teacher and the student.

    FuseLLM Eq. 2-3: ``L_fusion = -E_t sum_v q_t(v) log p_t(v)`` (``kind="ce"``) or
    ``KL(q_t || p_t) = sum_v q_t(v) (log q_t(v) - log p_t(v))`` (``kind="kl"``; same
    gradient, but 0 when the student matches the teacher, which makes it easier to read in
    logs). Only the teacher's top-k ids enter the sum.

    Teacher distribution ``q``:

    - ``tail_bucket=False`` (paper): ``q`` is the teacher renormalised over its top-k,
      ``q ∝ exp(teacher_logprobs / temperature)``, and the student is
      ``softmax(student_logits / temperature)`` over the full vocabulary. The top-k mass
      is thereby inflated to 1: the student is pushed to put *all* its mass on the k ids.
    - ``tail_bucket=True``: ``q`` keeps the teacher's true probabilities and the mass it
      puts outside the top-k (``teacher_tail_logmass``, or ``1 - sum q`` if not given)
      becomes one extra category, compared with the student's total mass outside the
      teacher's ids (summed over those tokens, not computed as 1 - top-k mass). The
      student is then only asked to match the *total* tail mass. The temperature tempers
      both sides' K + 1 categories (see :class:`~fuselm.train.sparse_ce.FusionTarget`).

    Positions are averaged over the shifted target mask (see :func:`shifted_target_mask`)
    intersected with "the teacher row has at least one entry" (rows of only -1 have no
    teacher: mask them, or fill them with :func:`fuselm.fuse.fill_fallback` beforehand).

    Args:
        student_logits: ``(B, T, V)`` student logits (any float dtype; maths in float32).
        teacher_ids: ``(B, T, K)`` int teacher ids in the student's vocabulary, -1 padded.
        teacher_logprobs: ``(B, T, K)`` teacher log-probabilities (ignored on padding).
        labels: ``(B, T)`` labels, ``ignore_index`` where no target.
        kind: ``"ce"`` (soft cross-entropy) or ``"kl"`` (forward KL, teacher ‖ student).
        temperature: softening of student and teacher (> 0); 1 in the paper.
        tail_bucket: add the teacher's tail mass as one extra category (see above).
        teacher_tail_logmass: ``(B, T)`` log of the teacher's mass outside its ids
            (from align); the tail bucket's mass.
        temperature_squared: multiply the loss by ``temperature ** 2`` (Hinton et al.).
        ignore_index: label value without a target.
        chunk_size: positions per chunk of the vocabulary-wide work (default: about 2^22
            logits per chunk).

    Returns:
        ``(loss, parts)``: scalar float32 mean over valid positions (0 if there are none),
        and detached logging parts ``{"fusion": loss, "fusion_tokens": count}``.

    Raises:
        ValueError: on bad shapes, ids outside ``[-1, V)``, duplicate ids in a row, NaN
            teacher log-probabilities at used entries, ``temperature <= 0`` or an unknown
            ``kind``.
    """
    t = loss_terms(
        student_logits,
        labels,
        teacher_ids,
        teacher_logprobs,
        kind=kind,
        temperature=temperature,
        tail_bucket=tail_bucket,
        teacher_tail_logmass=teacher_tail_logmass,
        temperature_squared=temperature_squared,
        with_clm=False,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
    return t.fusion, {"fusion": t.fusion.detach(), "fusion_tokens": t.fusion_tokens.detach()}


def combined_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    *,
    lam: float = 0.9,
    kind: FusionKind = "ce",
    temperature: float = 1.0,
    tail_bucket: bool = False,
    teacher_tail_logmass: Tensor | None = None,
    temperature_squared: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """FuseLLM's training objective ``lam · CLM + (1 - lam) · fusion`` (Eq. 1).

    Both terms are computed in one pass over the logits and their gradients accumulate in
    one buffer; the student's log-partition is shared when ``temperature == 1`` (always
    with the tail bucket, whose student side is at temperature 1). With ``lam == 1`` (the
    CLM-only control) the teacher is not needed and not used; the fusion part is then
    reported as 0 with 0 tokens.

    Both terms are means over their own valid positions: CLM over the shifted target mask,
    fusion over the positions of that mask that have a teacher row.

    Args:
        student_logits: ``(B, T, V)``.
        labels: ``(B, T)``.
        teacher_ids: ``(B, T, K)``; required unless ``lam == 1``.
        teacher_logprobs: ``(B, T, K)``; required unless ``lam == 1``.
        lam: weight of the CLM term, in [0, 1]; 0.9 in the paper.
        kind: fusion term, ``"ce"`` or ``"kl"`` (see :func:`fusion_loss`).
        temperature: fusion temperature (the CLM term always uses 1).
        tail_bucket: see :func:`fusion_loss`.
        teacher_tail_logmass: ``(B, T)``; see :func:`fusion_loss`.
        temperature_squared: see :func:`fusion_loss`.
        ignore_index: label value without a target.
        chunk_size: see :func:`fusion_loss`.

    Returns:
        ``(loss, parts)`` with detached parts ``clm``, ``fusion``, ``total`` (each logged
        separately), the token counts ``clm_tokens``, ``fusion_tokens``, and the gold
        diagnostics' sums when there is a teacher.

    Raises:
        ValueError: ``lam`` outside [0, 1], a missing teacher with ``lam < 1``, or any
            error of :func:`fusion_loss`.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (1 = CLM-only control), got {lam}")
    if lam < 1.0 and (teacher_ids is None or teacher_logprobs is None):
        raise ValueError(f"lam={lam} < 1 needs teacher_ids and teacher_logprobs")
    use = lam < 1.0
    t = loss_terms(
        student_logits,
        labels,
        teacher_ids if use else None,
        teacher_logprobs if use else None,
        kind=kind,
        temperature=temperature,
        tail_bucket=tail_bucket,
        teacher_tail_logmass=teacher_tail_logmass if use else None,
        temperature_squared=temperature_squared,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
    loss = t.clm if not use else lam * t.clm + (1.0 - lam) * t.fusion
    parts = {
        "clm": t.clm.detach(),
        "fusion": t.fusion.detach(),
        "total": loss.detach(),
        "clm_tokens": t.clm_tokens.detach(),
        "fusion_tokens": t.fusion_tokens.detach(),
        **t.diagnostics,
    }
    return loss, parts
