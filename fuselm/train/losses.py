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
"""

from __future__ import annotations

import torch
from torch import Tensor

from fuselm.train.sparse_ce import (
    IGNORE_INDEX,
    FusionKind,
    _check_fusion_options,
    _check_logits_labels,
    _check_teacher,
    _clm_targets,
    _FusionTarget,
    _SparseTargetCE,
    shifted_target_mask,
)

__all__ = ["IGNORE_INDEX", "clm_loss", "combined_loss", "fusion_loss", "shifted_target_mask"]


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
    _check_logits_labels(student_logits, labels, ignore_index)
    mask, next_ids = _clm_targets(labels, ignore_index)
    _, nll = _SparseTargetCE.apply(
        student_logits, None, None, None, None, 1.0, next_ids, mask, chunk_size
    )
    return torch.where(mask, nll, 0.0).sum() / mask.sum().clamp_min(1)


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
      ``q ∝ exp(teacher_logprobs / temperature)``. The top-k mass is thereby inflated to 1:
      the student is pushed to put *all* its mass on the k ids.
    - ``tail_bucket=True``: ``q`` keeps the teacher's true probabilities and the mass it
      puts outside the top-k (``teacher_tail_logmass``, or ``1 - sum q`` if not given)
      becomes one extra category, compared with the student's total mass outside the
      teacher's ids (summed over those tokens, not computed as 1 - top-k mass). The
      student is then only asked to match the *total* tail mass. It needs
      ``temperature == 1``: the tempered tail ``sum p(v)^(1/temp)`` over unseen ids cannot
      be recovered from the top-k.

    The student is ``p = softmax(student_logits / temperature)`` over the full vocabulary.

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
            (from capture); only with ``tail_bucket``.
        ignore_index: label value without a target.
        chunk_size: positions per chunk of the vocabulary-wide work (default: about 2^22
            logits per chunk).

    Returns:
        ``(loss, parts)``: scalar float32 mean over valid positions (0 if there are none),
        and detached logging parts ``{"fusion": loss, "fusion_tokens": count}``.

    Raises:
        ValueError: on bad shapes, ids outside ``[-1, V)``, duplicate ids in a row, NaN
            teacher log-probabilities at used entries, ``temperature <= 0``, an unknown
            ``kind``, or ``tail_bucket`` with ``temperature != 1``.
    """
    _check_logits_labels(student_logits, labels, ignore_index)
    target = _fusion_target(
        student_logits,
        teacher_ids,
        teacher_logprobs,
        labels,
        kind,
        temperature,
        tail_bucket,
        teacher_tail_logmass,
        ignore_index,
    )
    ce, _ = _SparseTargetCE.apply(
        student_logits,
        target.ids,
        target.entry,
        target.q,
        target.q_tail,
        temperature,
        None,
        None,
        chunk_size,
    )
    total, count = target.reduce(ce, kind)
    loss = total / count.clamp_min(1)
    return loss, {"fusion": loss.detach(), "fusion_tokens": count.detach()}


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
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """FuseLLM's training objective ``lam · CLM + (1 - lam) · fusion`` (Eq. 1).

    Both terms are computed in one pass over the logits and their gradients accumulate in
    one buffer; the student's log-partition is shared when ``temperature == 1``. With
    ``lam == 1`` (the CLM-only control) the teacher is not needed and not used; the fusion
    part is then reported as 0 with 0 tokens.

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
        ignore_index: label value without a target.
        chunk_size: see :func:`fusion_loss`.

    Returns:
        ``(loss, parts)`` with detached parts ``clm``, ``fusion``, ``total`` (each logged
        separately) and the token counts ``clm_tokens``, ``fusion_tokens``.

    Raises:
        ValueError: ``lam`` outside [0, 1], a missing teacher with ``lam < 1``, or any
            error of :func:`fusion_loss`.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (1 = CLM-only control), got {lam}")
    _check_logits_labels(student_logits, labels, ignore_index)
    mask, next_ids = _clm_targets(labels, ignore_index)
    if lam == 1.0:
        _, nll = _SparseTargetCE.apply(
            student_logits, None, None, None, None, 1.0, next_ids, mask, chunk_size
        )
        clm_count = mask.sum()
        clm = torch.where(mask, nll, 0.0).sum() / clm_count.clamp_min(1)
        fusion = torch.zeros((), device=clm.device)
        fus_count = torch.zeros((), dtype=torch.long, device=clm.device)
        loss = clm
    else:
        if teacher_ids is None or teacher_logprobs is None:
            raise ValueError(f"lam={lam} < 1 needs teacher_ids and teacher_logprobs")
        target = _fusion_target(
            student_logits,
            teacher_ids,
            teacher_logprobs,
            labels,
            kind,
            temperature,
            tail_bucket,
            teacher_tail_logmass,
            ignore_index,
        )
        ce, nll = _SparseTargetCE.apply(
            student_logits,
            target.ids,
            target.entry,
            target.q,
            target.q_tail,
            temperature,
            next_ids,
            mask,
            chunk_size,
        )
        clm_count = mask.sum()
        clm = torch.where(mask, nll, 0.0).sum() / clm_count.clamp_min(1)
        fus_total, fus_count = target.reduce(ce, kind)
        fusion = fus_total / fus_count.clamp_min(1)
        loss = lam * clm + (1.0 - lam) * fusion
    parts = {
        "clm": clm.detach(),
        "fusion": fusion.detach(),
        "total": loss.detach(),
        "clm_tokens": clm_count.detach(),
        "fusion_tokens": fus_count.detach(),
    }
    return loss, parts


# --------------------------------------------------------------------------- internals


def _fusion_target(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    kind: str,
    temperature: float,
    tail_bucket: bool,
    teacher_tail_logmass: Tensor | None,
    ignore_index: int,
) -> _FusionTarget:
    """Validate the teacher and options, then build the sparse target (both losses use it)."""
    _check_fusion_options(kind, temperature, tail_bucket, teacher_tail_logmass)
    _check_teacher(
        student_logits, teacher_ids, teacher_logprobs, teacher_tail_logmass, labels, ignore_index
    )
    return _FusionTarget.build(
        teacher_ids,
        teacher_logprobs,
        labels,
        temperature,
        tail_bucket,
        teacher_tail_logmass,
        ignore_index,
    )
