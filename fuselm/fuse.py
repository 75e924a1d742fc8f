"""Fusion of aligned source distributions into one sparse teacher per target position.

Stage 4 of the method (SPEC §2.4; FuseLLM, Wan et al. 2024, arXiv 2401.10491, §3.3).
Every source LM has already been *aligned* onto the target's positions and vocabulary, so
for a batch of ``B`` target blocks of length ``T`` and ``S`` sources the inputs are

- ``ids (S, B, T, K)`` int: target-vocabulary ids of each source's top-k, padded with -1;
- ``logprobs (S, B, T, K)`` float: the source's log-probabilities of those ids (log-softmax
  over the source's full vocabulary, so they are true probabilities; -inf on padding);
- ``valid (S, B, T)`` bool: the source has a prediction for this target position;
- ``gold_logprob (S, B, T)`` float: the source's log-probability of the gold text its
  prediction at this position covers (0 where it covers nothing);
- ``next_bytes (S, B, T)`` int: how many UTF-8 bytes of text that gold log-probability
  covers (0 where the source contributes nothing, e.g. padding);
- optionally ``tail_logmass (S, B, T)`` float: the log of each source's mass outside its
  ids (the align stage's ``AlignedBlock.tail_logmass``). The fused tail is then the same
  mixture of the sources' tails (MinCE: the chosen source's; AvgCE: the weighted sum),
  plus the mass of entries a ``max_k`` cap cuts off, so the fused target loses no mass.

Each row of ``B`` must be one block (fuse *before* packing blocks into training rows):
sequence-level cross-entropies are computed per row. A single block may also be passed
without the ``B`` dimension (``(S, T, K)`` etc.); the result then has no ``B`` dimension
either. Use :func:`stack_sources` to build the stacked tensors from per-source tensors
whose ``K`` differ. The target's own captured distribution can be one of the sources (the
paper's target is also its source #0); put it first to let it win ties.

The fused output is again sparse: the union of the sources' top-k ids per position with
mixed probabilities ``p(v) = sum_s w_s · p_s(v)``. Its width is at most ``S · K`` (every
source contributes at most its ``K`` distinct ids; an id shared by several sources takes
one slot and the *sum* of their weighted masses) and is trimmed to the widest row actually
used, or to ``max_k`` if given. Entries are ordered by decreasing probability.

Fusion functions are picked by name from :data:`FUSION_FUNCTIONS` (see :func:`get_fusion`);
they are pure functions on tensors: no I/O, no models. Their shared tensor internals
(input checks, weights, the sparse mixture) are in :mod:`fuselm.fuse_kernels`.

Traps this module exists to avoid (SPEC §3):

- Cross-entropies of sources with different tokenizers are compared per **byte** of text
  covered, never per token; otherwise the finer tokenizer (more, easier predictions) wins
  for that reason alone.
- AvgCE weights are ``softmax(-CE / tau)`` or normalised ``1 / CE``; the research code's
  ``softmax(exp(-CE))`` squeezes every CE into (0, 1] and is nearly uniform.
- A NaN anywhere in the inputs raises, naming the source and position; it must never turn
  into a silently chosen (or silently dropped) source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fuselm.fuse_kernels import (
    Level,
    Weighting,
    _avg_weights,
    _check_inputs,
    _check_sequence_ce,
    _check_tail,
    _min_weights,
    _mix,
)

# Default AvgCE temperature in nats per byte. Per-byte CEs of reasonable LMs lie around
# 0.5-1.5 nats/byte and differ between sources by a few tenths at most, so tau must be of
# that order to separate them: with tau = 0.1 a source 0.1 nat/byte worse gets e^-1 ≈ 0.37
# times the weight, one 0.5 nat/byte worse e^-5 ≈ 0.007 times.
DEFAULT_TAU = 0.1


@dataclass(frozen=True)
class FusionResult:
    """Output of a fusion function (shapes for batched input; unbatched input drops ``B``).

    Attributes:
        ids: ``(B, T, K_out)`` int64 fused target-vocabulary ids, -1 padded, ordered by
            decreasing probability; ``K_out <= S * K`` (or ``<= max_k``).
        logprobs: ``(B, T, K_out)`` float32 fused log-probabilities, -inf on padding. They
            are true (unnormalised over the top-k) log-probabilities: the mass outside the
            ids is the weighted mix of the sources' tail masses.
        valid: ``(B, T)`` bool; False where no source had a prediction. Such rows are all
            padding; the caller masks them or fills them with :func:`fill_fallback`.
        weights: ``(S, B, T)`` float32 mixture weight of each source at each position; sums
            to 1 over sources where ``valid``, 0 everywhere where not.
        ce: per-byte cross-entropy (nats/byte) of each source that the weights were computed
            from: ``(S, B)`` at sequence level, ``(S, B, T)`` at token level; +inf where the
            source covers no bytes.
        selected: ``(B, T)`` int64 index of the source with the largest weight (for
            ``min_ce``, the chosen one), -1 where not ``valid``.
        tail_logmass: ``(B, T)`` float32 log of the fused mass outside ``ids`` (-inf where
            not ``valid``), or None when the sources' tails were not given.
    """

    ids: Tensor
    logprobs: Tensor
    valid: Tensor
    weights: Tensor
    ce: Tensor
    selected: Tensor
    tail_logmass: Tensor | None = None

    def win_counts(self) -> Tensor:
        """Count the positions at which each source had the largest weight.

        Returns:
            ``(S,)`` int64 counts over all valid positions (ties go to the lower index).
        """
        num_sources = self.weights.shape[0]
        sel = self.selected[self.selected >= 0]
        return torch.bincount(sel.flatten(), minlength=num_sources)


def stack_sources(tensors: Sequence[Tensor], pad_value: float | int) -> Tensor:
    """Stack per-source tensors into one, padding the last dimension to the widest.

    Args:
        tensors: ``S`` tensors of shape ``(..., K_s)`` that agree on all but the last dim.
        pad_value: value for the padding (-1 for ids, ``-inf`` for log-probabilities).

    Returns:
        ``(S, ..., max K_s)`` tensor.
    """
    if not tensors:
        raise ValueError("stack_sources needs at least one source")
    width = max(t.shape[-1] for t in tensors)
    padded = [
        torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=pad_value) for t in tensors
    ]
    return torch.stack(padded)


def per_byte_ce(gold_logprob: Tensor, next_bytes: Tensor, level: Level = "sequence") -> Tensor:
    """Cross-entropy per byte of text covered, comparable across tokenizers.

    Sequence level: ``sum_t -gold_logprob[t] / sum_t next_bytes[t]`` over the positions that
    cover bytes, i.e. the source's negative log-likelihood of the block text divided by the
    length of that text in bytes. Token level: ``-gold_logprob[t] / next_bytes[t]``.
    A per-token average would divide by the number of the source's own tokens instead,
    which favours fine tokenizers: they make more predictions, each of them easier.

    Args:
        gold_logprob: ``(S, B, T)`` log-probability of the gold text covered at each position.
        next_bytes: ``(S, B, T)`` UTF-8 bytes covered at each position (0 = nothing).
        level: ``"sequence"`` (one CE per block) or ``"token"`` (one per position).

    Returns:
        ``(S, B)`` for sequence level, ``(S, B, T)`` for token level, float32, in nats per
        byte; +inf where no byte is covered (the source cannot be compared there).
    """
    covered = next_bytes > 0  # (S, B, T)
    nbytes = next_bytes.to(torch.float32)
    nll = torch.where(covered, -gold_logprob.to(torch.float32), 0.0)  # (S, B, T)
    inf = torch.tensor(float("inf"))
    if level == "sequence":
        total_bytes = nbytes.sum(-1)  # (S, B)
        return torch.where(total_bytes > 0, nll.sum(-1) / total_bytes.clamp_min(1.0), inf)
    if level == "token":
        return torch.where(covered, nll / nbytes.clamp_min(1.0), inf)
    raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")


def min_ce(
    ids: Tensor,
    logprobs: Tensor,
    valid: Tensor,
    gold_logprob: Tensor,
    next_bytes: Tensor,
    *,
    level: Level = "sequence",
    max_k: int | None = None,
    source_names: Sequence[str] | None = None,
    sequence_ce: Tensor | None = None,
    tail_logmass: Tensor | None = None,
) -> FusionResult:
    """MinCE: take the distribution of the source with the lowest per-byte cross-entropy.

    The paper's default fusion (FuseLLM §3.3, Table 5). At ``level="sequence"`` the CE is
    computed once per block and the block's best source is used at every position; at
    ``level="token"`` the choice is made per position. Where the best source has no
    prediction (``valid`` False), the best source among those that have one is used: the
    same rule as AvgCE's renormalisation over valid sources, in the limit tau -> 0. Ties
    go to the lower source index (put the target itself first to prefer it).

    Args:
        ids: ``(S, B, T, K)`` aligned top-k ids, -1 padded.
        logprobs: ``(S, B, T, K)`` their log-probabilities, -inf on padding.
        valid: ``(S, B, T)`` the source has a prediction at this position.
        gold_logprob: ``(S, B, T)`` log-probability of the gold text covered.
        next_bytes: ``(S, B, T)`` bytes covered.
        level: ``"sequence"`` (paper) or ``"token"``.
        max_k: keep at most this many fused entries per position (highest first).
        source_names: names used in error messages; defaults to ``source 0``, ...
        sequence_ce: optional ``(S, B)`` (or ``(S,)`` unbatched) per-byte CE of each source
            on each whole block, used instead of the one computed from ``gold_logprob`` /
            ``next_bytes`` at the aligned positions (``level="sequence"`` only). Pass the
            CE over *all* of a source's positions (``AlignedBlock.ce_per_byte()``) so that
            sources are compared on the same text whatever their alignment coverage.
        tail_logmass: optional ``(S, B, T)`` log of each source's mass outside its ids;
            the result then carries the fused tail (see the module docstring).

    Returns:
        The fused sparse distribution with per-source weights (one-hot) and selection.

    Raises:
        ValueError: on NaN inputs (naming source and position) or inconsistent shapes.
    """
    inputs = (ids, logprobs, valid, gold_logprob, next_bytes)
    return _fuse(
        inputs,
        level=level,
        rule="min",
        max_k=max_k,
        source_names=source_names,
        sequence_ce=sequence_ce,
        tail_logmass=tail_logmass,
    )


def avg_ce(
    ids: Tensor,
    logprobs: Tensor,
    valid: Tensor,
    gold_logprob: Tensor,
    next_bytes: Tensor,
    *,
    level: Level = "sequence",
    weighting: Weighting = "softmax",
    tau: float = DEFAULT_TAU,
    max_k: int | None = None,
    source_names: Sequence[str] | None = None,
    sequence_ce: Tensor | None = None,
    tail_logmass: Tensor | None = None,
) -> FusionResult:
    """AvgCE: mix the sources with weights that decrease with their per-byte cross-entropy.

    FuseLLM §3.3 (AvgCE). Weights, computed over the sources valid at each position:

    - ``weighting="softmax"``: ``w_s ∝ exp(-CE_s / tau)``, tau in nats per byte (default
      0.1; tau -> 0 gives MinCE, tau -> inf the uniform mix). Not ``softmax(exp(-CE))``,
      the research code's version, which is nearly uniform.
    - ``weighting="inverse"``: ``w_s ∝ 1 / CE_s`` (a source with CE 0 takes all weight).

    Sources with infinite CE (they cover no bytes, or gave the gold text probability 0)
    get weight 0 unless every valid source has infinite CE, in which case the valid
    sources are mixed uniformly.

    Args:
        ids: ``(S, B, T, K)`` aligned top-k ids, -1 padded.
        logprobs: ``(S, B, T, K)`` their log-probabilities, -inf on padding.
        valid: ``(S, B, T)`` the source has a prediction at this position.
        gold_logprob: ``(S, B, T)`` log-probability of the gold text covered.
        next_bytes: ``(S, B, T)`` bytes covered.
        level: ``"sequence"`` (one weight vector per block, paper) or ``"token"``.
        weighting: ``"softmax"`` or ``"inverse"``.
        tau: softmax temperature in nats per byte (> 0).
        max_k: keep at most this many fused entries per position (highest first).
        source_names: names used in error messages; defaults to ``source 0``, ...
        sequence_ce: optional whole-block per-byte CE, ``(S, B)`` or ``(S,)``; see
            :func:`min_ce` (``level="sequence"`` only).
        tail_logmass: optional ``(S, B, T)``; see :func:`min_ce`.

    Returns:
        The fused sparse distribution with the per-source weights.

    Raises:
        ValueError: on NaN inputs (naming source and position), bad ``tau``/``weighting``
            or inconsistent shapes.
    """
    if weighting not in ("softmax", "inverse"):
        raise ValueError(f"weighting must be 'softmax' or 'inverse', got {weighting!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (nats per byte), got {tau}")
    inputs = (ids, logprobs, valid, gold_logprob, next_bytes)
    return _fuse(
        inputs,
        level=level,
        rule="avg",
        weighting=weighting,
        tau=tau,
        max_k=max_k,
        source_names=source_names,
        sequence_ce=sequence_ce,
        tail_logmass=tail_logmass,
    )


def fill_fallback(
    ids: Tensor,
    logprobs: Tensor,
    valid: Tensor,
    next_token_ids: Tensor,
    tail_logmass: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Give positions without a teacher the one-hot of the *next* (gold) target token.

    SPEC §2.3: the fallback target of position t is token t+1 (what position t predicts),
    never token t (the research code's bug). The caller passes the already shifted ids:
    ``next_token_ids[..., t] = input_ids[..., t + 1]``; entries < 0 (e.g. the last position
    or padding) stay invalid.

    Args:
        ids: ``(B, T, K)`` fused ids.
        logprobs: ``(B, T, K)`` fused log-probabilities.
        valid: ``(B, T)`` positions that have a teacher.
        next_token_ids: ``(B, T)`` the gold next target token of each position, -1 if none.
        tail_logmass: optional ``(B, T)`` fused tail; a one-hot has none (-inf).

    Returns:
        ``(ids, logprobs, valid, tail_logmass)`` with the one-hot (id, log-prob 0) in column
        0 of each filled row; ``valid`` now also covers the filled rows.
    """
    fill = ~valid & (next_token_ids >= 0)  # (B, T)
    one_hot_ids = torch.full_like(ids, -1)
    one_hot_ids[..., 0] = next_token_ids
    one_hot_lp = torch.full_like(logprobs, float("-inf"))
    one_hot_lp[..., 0] = 0.0
    ids = torch.where(fill[..., None], one_hot_ids, ids)
    logprobs = torch.where(fill[..., None], one_hot_lp, logprobs)
    if tail_logmass is not None:
        tail_logmass = torch.where(fill, float("-inf"), tail_logmass)
    return ids, logprobs, valid | fill, tail_logmass


def blend_with_gold(
    ids: Tensor,
    logprobs: Tensor,
    tail_logmass: Tensor | None,
    weight: Tensor,
    next_token_ids: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mix a fused target with the one-hot of the gold next token: ``w·q + (1 - w)·1[gold]``.

    Where a teacher knows no more than the gold text (say MinCE picked the target itself),
    distilling it only anchors the student to where it started; giving such positions the
    gold one-hot makes their fusion term at temperature 1 exactly the CLM term, so they are
    trained by plain CLM. ``weight`` in between scales the teacher's share (its advantage).
    The tail is scaled by ``w`` like every entry, so the mixture still sums to 1.

    Args:
        ids: ``(B, T, K)`` fused ids (-1 padded), or ``(T, K)``.
        logprobs: ``(B, T, K)`` their log-probabilities (-inf padded).
        tail_logmass: ``(B, T)`` fused tail, or None.
        weight: ``(B, T)`` teacher share in [0, 1]; 1 leaves the row unchanged.
        next_token_ids: ``(B, T)`` gold next target token, -1 where none (row unchanged).

    Returns:
        ``(ids, logprobs, tail_logmass)``; rows sorted by decreasing probability again.
    """
    w = torch.where(next_token_ids >= 0, weight.to(torch.float32).clamp(0.0, 1.0), 1.0)
    gold_ids = torch.full_like(ids, -1)
    gold_ids[..., 0] = next_token_ids.clamp_min(-1)
    gold_lp = torch.full_like(logprobs, float("-inf"))
    gold_lp[..., 0] = 0.0
    both_ids = torch.stack([ids, gold_ids])  # (2, ..., K)
    both_lp = torch.stack([logprobs.to(torch.float32), gold_lp.to(torch.float32)])
    if both_ids.dim() == 3:  # unbatched (2, T, K) -> (2, 1, T, K)
        both_ids, both_lp, w = both_ids.unsqueeze(1), both_lp.unsqueeze(1), w.unsqueeze(0)
    weights = torch.stack([w, 1.0 - w])  # (2, B, T)
    entry_ok = (both_ids >= 0) & torch.isfinite(both_lp)
    out_ids, out_lp, _ = _mix(both_ids, both_lp, entry_ok, weights, None)
    if ids.dim() == 2:
        out_ids, out_lp, w = out_ids[0], out_lp[0], w[0]
    if tail_logmass is not None:
        tail_logmass = tail_logmass + w.log()
    return out_ids, out_lp, tail_logmass


# name -> (function, one-line description with paper reference). Explicit on purpose: the
# set of fusion rules is small and every one must be documented and tested.
FUSION_FUNCTIONS: dict[str, tuple[Callable[..., FusionResult], str]] = {
    "min_ce": (
        min_ce,
        "distribution of the source with the lowest per-byte CE, per block or per token "
        "(FuseLLM arXiv 2401.10491 §3.3, MinCE; the paper's default)",
    ),
    "avg_ce": (
        avg_ce,
        "mix of the sources weighted by softmax(-CE/tau) or 1/CE of their per-byte CE "
        "(FuseLLM arXiv 2401.10491 §3.3, AvgCE)",
    ),
}


def get_fusion(name: str) -> Callable[..., FusionResult]:
    """Look up a fusion function by its snake_case name.

    Args:
        name: a key of :data:`FUSION_FUNCTIONS`.

    Returns:
        The fusion function.

    Raises:
        ValueError: for an unknown name; the message lists the valid names.
    """
    try:
        return FUSION_FUNCTIONS[name][0]
    except KeyError:
        valid = ", ".join(sorted(FUSION_FUNCTIONS))
        raise ValueError(f"unknown fusion function {name!r}; valid names: {valid}") from None


# --------------------------------------------------------------------------- internals


def _fuse(
    inputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    *,
    level: Level,
    rule: Literal["min", "avg"],
    weighting: Weighting = "softmax",
    tau: float = DEFAULT_TAU,
    max_k: int | None,
    source_names: Sequence[str] | None,
    sequence_ce: Tensor | None = None,
    tail_logmass: Tensor | None = None,
) -> FusionResult:
    """Shared body of the fusion functions: validate, weight, mix."""
    ids, logprobs, valid, gold_logprob, next_bytes = inputs
    if level not in ("sequence", "token"):
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")
    if max_k is not None and max_k < 1:
        raise ValueError(f"max_k must be >= 1 or None, got {max_k}")
    unbatched = ids.dim() == 3
    if unbatched:  # (S, T, K) -> (S, 1, T, K)
        ids, logprobs = ids.unsqueeze(1), logprobs.unsqueeze(1)
        valid, gold_logprob, next_bytes = (
            valid.unsqueeze(1),
            gold_logprob.unsqueeze(1),
            next_bytes.unsqueeze(1),
        )
        if tail_logmass is not None:
            tail_logmass = tail_logmass.unsqueeze(1)
    _check_inputs(ids, logprobs, valid, gold_logprob, next_bytes, source_names)
    if tail_logmass is not None:
        _check_tail(tail_logmass, valid, source_names)
    if sequence_ce is not None:
        sequence_ce = _check_sequence_ce(sequence_ce, ids.shape[:2], level, unbatched, source_names)

    # A source is usable at a position only if it claims a prediction there *and* has at
    # least one real entry; entries with probability 0 carry no information.
    entry_ok = (ids >= 0) & torch.isfinite(logprobs)  # (S, B, T, K)
    usable = valid & entry_ok.any(-1)  # (S, B, T)

    if sequence_ce is not None:
        ce = sequence_ce  # (S, B) whole-block CE given by the caller
    else:
        ce = per_byte_ce(gold_logprob, next_bytes, level)  # (S, B) or (S, B, T)
    ce_bt = ce.unsqueeze(-1).expand_as(usable) if level == "sequence" else ce  # (S, B, T)
    if rule == "min":
        weights = _min_weights(ce_bt, usable)
    else:
        weights = _avg_weights(ce_bt, usable, weighting, tau)  # (S, B, T)

    out_ids, out_lp, cut = _mix(ids, logprobs, entry_ok, weights, max_k)  # (B, T, K_out)
    out_valid = usable.any(0)  # (B, T)
    selected = torch.where(out_valid, weights.argmax(0), -1)  # (B, T)
    tail = None
    if tail_logmass is not None:
        # The same mixture as the entries: log sum_s w_s tail_s, plus what max_k cut off.
        mixed = (tail_logmass.to(torch.float32) + weights.log()).logsumexp(0)  # (B, T)
        tail = torch.where(out_valid, torch.logaddexp(mixed, cut), float("-inf"))
    if unbatched:
        return FusionResult(
            out_ids[0],
            out_lp[0],
            out_valid[0],
            weights[:, 0],
            ce.squeeze(1),
            selected[0],
            None if tail is None else tail[0],
        )
    return FusionResult(out_ids, out_lp, out_valid, weights, ce, selected, tail)
