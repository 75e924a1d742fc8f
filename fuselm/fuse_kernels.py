"""Tensor kernels behind the fusion rules: input checks, per-position weights, sparse mix.

Why a module of its own: :mod:`fuselm.fuse` states *what* each fusion rule computes
(MinCE, AvgCE, the per-byte CE they rank by) and is the API; this module holds *how*,
the vectorised internals that every rule shares and that are easy to get subtly wrong:
refusing NaNs with the source and position named, the weights of MinCE/AvgCE over the
sources usable at each position, and the log-space union mixture of sparse top-k
distributions. Pure functions on tensors, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Level = Literal["sequence", "token"]


Weighting = Literal["softmax", "inverse"]


def _check_inputs(
    ids: Tensor,
    logprobs: Tensor,
    valid: Tensor,
    gold_logprob: Tensor,
    next_bytes: Tensor,
    source_names: Sequence[str] | None,
) -> None:
    """Validate shapes/dtypes and refuse NaNs, naming source and position."""
    if ids.dim() != 4:
        raise ValueError(f"ids must be (S, B, T, K) or (S, T, K), got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != ids {tuple(ids.shape)}")
    for name, t in (("valid", valid), ("gold_logprob", gold_logprob), ("next_bytes", next_bytes)):
        if t.shape != ids.shape[:-1]:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} != ids shape without K {tuple(ids.shape[:-1])}"
            )
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    num_sources = ids.shape[0]
    names = (
        list(source_names)
        if source_names is not None
        else [f"source {s}" for s in range(num_sources)]
    )
    if len(names) != num_sources:
        raise ValueError(f"{len(names)} source_names for {num_sources} sources")
    if (ids < -1).any():
        s, b, t = _first(ids.lt(-1).any(-1))
        raise ValueError(f"ids < -1 in {names[s]} at block {b}, position {t} (padding is -1)")
    checks = [("logprobs", logprobs.isnan().any(-1)), ("gold_logprob", gold_logprob.isnan())]
    if next_bytes.dtype.is_floating_point:
        checks.append(("next_bytes", next_bytes.isnan()))
    for what, bad in checks:  # bad: (S, B, T)
        if bad.any():
            s, b, t = _first(bad)
            raise ValueError(
                f"NaN in {what} of {names[s]} at block {b}, position {t}; refusing to fuse "
                "(a NaN would silently decide which source is chosen)"
            )
    if (next_bytes < 0).any():
        s, b, t = _first(next_bytes < 0)
        raise ValueError(f"negative next_bytes in {names[s]} at block {b}, position {t}")


def _check_sequence_ce(
    ce: Tensor,
    sb: tuple[int, ...],
    level: str,
    unbatched: bool,
    source_names: Sequence[str] | None,
) -> Tensor:
    """Validate an explicit per-block CE and return it as float32 ``(S, B)``."""
    if level != "sequence":
        raise ValueError("sequence_ce is only meaningful with level='sequence'")
    ce = torch.as_tensor(ce, dtype=torch.float32)
    if unbatched and ce.dim() == 1:
        ce = ce.unsqueeze(1)  # (S,) -> (S, 1)
    if tuple(ce.shape) != tuple(sb):
        want = f"({sb[0]},)" if unbatched else str(tuple(sb))
        raise ValueError(f"sequence_ce shape {tuple(ce.shape)} != (S, B) {want}")
    if ce.isnan().any():
        s, b = (int(i) for i in ce.isnan().nonzero()[0])
        name = source_names[s] if source_names is not None else f"source {s}"
        raise ValueError(f"NaN in sequence_ce of {name} at block {b}; refusing to fuse")
    if (ce < 0).any():
        raise ValueError("sequence_ce must be >= 0 (nats per byte; +inf = not comparable)")
    return ce


def _check_tail(tail: Tensor, valid: Tensor, source_names: Sequence[str] | None) -> None:
    """The sources' tails: ``(S, B, T)`` log-masses <= 0, no NaN where a source is valid."""
    if tail.shape != valid.shape:
        raise ValueError(f"tail_logmass shape {tuple(tail.shape)} != valid {tuple(valid.shape)}")
    bad = valid & (tail.isnan() | (tail > 1e-4))
    if bad.any():
        s, b, t = _first(bad)
        name = source_names[s] if source_names is not None else f"source {s}"
        raise ValueError(
            f"tail_logmass of {name} at block {b}, position {t} is {float(tail[s, b, t])}; "
            "it must be a log-probability (<= 0)"
        )


def _first(mask: Tensor) -> tuple[int, int, int]:
    """Index ``(s, b, t)`` of the first True entry of a ``(S, B, T)`` mask."""
    s, b, t = (int(i) for i in mask.nonzero()[0])
    return s, b, t


def _min_weights(ce: Tensor, usable: Tensor) -> Tensor:
    """One-hot weights on the lowest-CE usable source per position.

    Args:
        ce: ``(S, B, T)`` per-byte CE (+inf allowed).
        usable: ``(S, B, T)``.

    Returns:
        ``(S, B, T)`` float32 one-hot over S where any source is usable, zeros elsewhere.
    """
    # A usable source with CE +inf must still beat an unusable one (it may be the only
    # source there), so map +inf to the largest finite float and unusable to +inf.
    key = torch.where(usable, ce.nan_to_num(posinf=torch.finfo(ce.dtype).max), float("inf"))
    best = key.argmin(0)  # (B, T); argmin returns the first minimum -> lower index wins ties
    weights = torch.nn.functional.one_hot(best, ce.shape[0]).movedim(-1, 0)  # (S, B, T)
    return weights.to(torch.float32) * usable.any(0)


def _avg_weights(ce: Tensor, usable: Tensor, weighting: Weighting, tau: float) -> Tensor:
    """AvgCE weights over usable sources, summing to 1 where any source is usable.

    Args:
        ce: ``(S, B, T)`` per-byte CE (+inf allowed).
        usable: ``(S, B, T)``.
        weighting: ``"softmax"`` or ``"inverse"``.
        tau: softmax temperature (nats per byte).

    Returns:
        ``(S, B, T)`` float32 weights.
    """
    finite = usable & torch.isfinite(ce)  # (S, B, T)
    # Where every usable source has infinite CE there is nothing to rank by: mix uniformly.
    all_inf = ~finite.any(0, keepdim=True) & usable  # (S, B, T)
    if weighting == "softmax":
        scores = torch.where(finite, -ce / tau, float("-inf"))
        scores = torch.where(all_inf, 0.0, scores)  # (S, B, T) log-weights
        weights = torch.softmax(scores, dim=0)
    else:
        # 1/CE; CE 0 (a perfect source) would be 1/0: clamp so that it takes all weight.
        raw = torch.where(finite, 1.0 / ce.clamp_min(1e-12), 0.0)
        raw = torch.where(all_inf, 1.0, raw)
        weights = raw / raw.sum(0, keepdim=True)
    # Rows with no usable source are 0/0 = NaN above: they get weight 0 everywhere.
    return torch.where(usable.any(0, keepdim=True), weights, 0.0).to(torch.float32)


def _mix(
    ids: Tensor, logprobs: Tensor, entry_ok: Tensor, weights: Tensor, max_k: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse mixture ``sum_s w_s p_s`` with the union of the sources' ids per position.

    Works in log space (``logsumexp`` of ``log w_s + log p_s`` over entries with the same id)
    so that a source with weight exactly 1 comes out bit-identical.

    Args:
        ids: ``(S, B, T, K)``.
        logprobs: ``(S, B, T, K)``.
        entry_ok: ``(S, B, T, K)`` real entries (id >= 0, finite log-prob).
        weights: ``(S, B, T)``.
        max_k: optional cap on the output width.

    Returns:
        ``(ids, logprobs, cut_logmass)``: ids and log-probs of shape ``(B, T, K_out)``,
        sorted by decreasing probability, padded with -1 / -inf, ``1 <= K_out <= S * K``;
        and ``(B, T)`` the log of the mixed mass of the entries that ``max_k`` cut off
        (-inf where nothing was cut), which belongs to the fused tail.
    """
    num_sources, batch, length, k = ids.shape
    n, m = batch * length, num_sources * k
    keep = entry_ok & (weights > 0).unsqueeze(-1)  # (S, B, T, K)
    vals = logprobs.to(torch.float32) + weights.log().unsqueeze(-1)  # (S, B, T, K)

    def flat(t: Tensor) -> Tensor:  # (S, B, T, K) -> (B*T, S*K)
        return t.permute(1, 2, 0, 3).reshape(n, m)

    sentinel = torch.iinfo(torch.int64).max  # sorts after every real id
    key = torch.where(flat(keep), flat(ids).to(torch.int64), sentinel)  # (N, M)
    val = torch.where(flat(keep), flat(vals), float("-inf"))  # (N, M)

    # Group equal ids: sort, mark the start of each run, number the runs.
    sorted_ids, order = key.sort(dim=-1, stable=True)  # (N, M)
    sorted_val = val.gather(-1, order)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    seg = starts.long().cumsum(-1) - 1  # (N, M) run index of each entry

    # Segment logsumexp: max per run, then sum of exp(v - max).
    seg_max = torch.full_like(sorted_val, float("-inf")).scatter_reduce(
        -1, seg, sorted_val, reduce="amax", include_self=True
    )  # (N, M)
    seg_max = torch.where(torch.isfinite(seg_max), seg_max, 0.0)
    seg_sum = torch.zeros_like(sorted_val).scatter_add(
        -1, seg, (sorted_val - seg_max.gather(-1, seg)).exp()
    )
    seg_lp = seg_sum.log() + seg_max  # (N, M); empty/unused runs -> -inf
    seg_ids = torch.full_like(sorted_ids, sentinel).scatter(-1, seg, sorted_ids)
    real = seg_ids != sentinel
    seg_lp = torch.where(real, seg_lp, float("-inf"))

    # Highest probability first (ties: lower id first, since runs are in id order).
    seg_lp, order = seg_lp.sort(dim=-1, descending=True, stable=True)
    seg_ids = seg_ids.gather(-1, order)
    real = real.gather(-1, order)
    width = max(int(real.sum(-1).max()) if n else 0, 1)
    if max_k is not None:
        width = min(width, max_k)
    out_ids = torch.where(real, seg_ids, -1)[:, :width].reshape(batch, length, width)
    out_lp = seg_lp[:, :width].reshape(batch, length, width)
    if seg_lp.shape[1] > width:
        cut = seg_lp[:, width:].logsumexp(-1)  # (N,); -inf where nothing real was cut
    else:
        cut = torch.full((n,), float("-inf"))
    return out_ids, out_lp, cut.reshape(batch, length)
