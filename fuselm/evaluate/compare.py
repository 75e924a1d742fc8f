"""Is one model better than another, beyond noise? Paired comparisons of bits per byte.

Why a module of its own: a "fused beat control" verdict must not be a sign read off two
numbers that differ in the fourth decimal. Two models scored on the same held-out blocks
are compared *paired*: the blocks are resampled with replacement (a bootstrap, stratified
by domain, so every resample keeps the domain mix of the held-out set) and the difference
of bits per byte is recomputed on each resample (sums of NLL over sums of bytes, as
``aggregate`` does). The 95% interval of that difference decides: entirely below 0 =
better, entirely above = worse, otherwise inconclusive. Where several seeds were run, the
spread over seeds is the noise instead (:func:`seed_verdict`).

Pure functions on arrays; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)
RESAMPLES = 2000
ALL = "all"


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` in bits per byte with its 95% interval.

    Attributes:
        diff: bits per byte of ``a`` minus those of ``b`` on all the blocks.
        low: 2.5th percentile of the difference over the bootstrap resamples.
        high: 97.5th percentile.
        blocks: blocks compared.
        verdict: ``better`` (``a`` lower, interval below 0), ``worse`` or ``inconclusive``.
    """

    diff: float
    low: float
    high: float
    blocks: int
    verdict: str

    def as_dict(self) -> dict[str, float | int | str]:
        """JSON-ready (rounded to 6 decimals)."""
        return {
            "diff": round(self.diff, 6),
            "ci95": [round(self.low, 6), round(self.high, 6)],
            "blocks": self.blocks,
            "verdict": self.verdict,
        }


def interval_verdict(low: float, high: float) -> str:
    """``better`` when the whole interval is below 0, ``worse`` above, else inconclusive."""
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    return "inconclusive"


def paired_bootstrap(
    a_nll: Sequence[float],
    a_bytes: Sequence[int],
    b_nll: Sequence[float],
    b_bytes: Sequence[int],
    domains: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Difference]:
    """Per domain and overall (``"all"``): ``a - b`` in bits per byte, paired by block.

    Args:
        a_nll: per block, model a's NLL in nats.
        a_bytes: per block, the bytes model a's NLL covers.
        b_nll: model b's, on the same blocks in the same order.
        b_bytes: model b's bytes.
        domains: per block, its domain.
        resamples: bootstrap resamples (fixed ``seed``: the interval is reproducible).
        seed: resampling seed.

    Returns:
        ``{domain: Difference}`` plus ``"all"``; the overall resample draws every domain's
        blocks from that domain (stratified), like the per-domain ones.

    Raises:
        ValueError: arrays of different lengths, or no block.
    """
    arrays = [np.asarray(x, np.float64) for x in (a_nll, a_bytes, b_nll, b_bytes)]
    dom = np.asarray(list(domains))
    if len({len(x) for x in arrays} | {len(dom)}) != 1:
        raise ValueError("paired_bootstrap needs one value per block for every array")
    if not len(dom):
        raise ValueError("paired_bootstrap needs at least one block")
    rng = np.random.default_rng(seed)
    per_domain: dict[str, Difference] = {}
    sums = np.zeros((4, resamples))  # resampled totals of the four arrays, all domains
    for d in sorted(set(dom.tolist())):
        idx = np.flatnonzero(dom == d)
        draws = idx[rng.integers(0, len(idx), (resamples, len(idx)))]  # (R, n_d)
        totals = np.stack([x[draws].sum(1) for x in arrays])  # (4, R)
        sums += totals
        full = [x[idx].sum() for x in arrays]
        per_domain[d] = _difference(full, totals, len(idx))
    full = [x.sum() for x in arrays]
    per_domain[ALL] = _difference(full, sums, len(dom))
    return per_domain


def _difference(full: Sequence[float], totals: np.ndarray, blocks: int) -> Difference:
    """The difference on all blocks and its percentile interval over the resamples."""

    def bpb(nll, nbytes):
        return np.asarray(nll) / np.maximum(np.asarray(nbytes), 1) / LN2

    diff = float(bpb(full[0], full[1]) - bpb(full[2], full[3]))
    boot = bpb(totals[0], totals[1]) - bpb(totals[2], totals[3])  # (R,)
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return Difference(diff, low, high, blocks, interval_verdict(low, high))


def seed_verdict(diffs: Sequence[float], spread: float = 2.0) -> tuple[float, float, str]:
    """Mean and sample std of per-seed paired differences ``a - b``, and a verdict.

    A difference is called only when its mean exceeds ``spread`` times the seed std
    (``better`` when negative); with a single seed the spread is unknown: inconclusive.

    Returns:
        ``(mean, std, verdict)``.
    """
    x = np.asarray(list(diffs), np.float64)
    if x.size == 0:
        raise ValueError("seed_verdict needs at least one difference")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
    if x.size < 2 or abs(mean) <= spread * std:
        return mean, std, "inconclusive"
    return mean, std, "better" if mean < 0 else "worse"
