"""Alignment diagnostics per source-target pair (issue 4: stored in the manifest).

Coverage below 100% is normal between different tokenizers (SPEC 3b: on Python code a
GPT-2-style target shares about half of its boundaries with a Llama-3-style source); these
numbers report it instead of hiding it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class AlignStats:
    """Counts over target positions; add blocks with ``+``.

    Attributes:
        positions: target positions seen.
        predictive: positions that predict a next token (all but the last per block, and
            not those whose next token is a control token).
        matched: predictive positions with a teacher prediction.
        one_to_one: matched positions whose predicted token is also matched at its end,
            i.e. the predicted target token and source token coincide exactly.
        many_to_one: matched positions whose previous position is unmatched (the
            prediction after a source token spanning several target tokens).
    """

    positions: int = 0
    predictive: int = 0
    matched: int = 0
    one_to_one: int = 0
    many_to_one: int = 0

    def __add__(self, other: AlignStats) -> AlignStats:
        """Sum two blocks' counts."""
        return AlignStats(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, ...]:
        """Fields as a tuple."""
        return (self.positions, self.predictive, self.matched, self.one_to_one, self.many_to_one)

    def summary(self) -> dict[str, float]:
        """Shares: ``coverage`` (matched / predictive), ``one_to_one`` (of predictive)."""
        p = self.predictive or 1
        return {
            **asdict(self),
            "coverage": self.matched / p,
            "one_to_one_share": self.one_to_one / p,
            "fallback_share": 1.0 - self.matched / p,
        }


def alignment_stats(matched: np.ndarray, tgt_special: np.ndarray | None = None) -> AlignStats:
    """Diagnostics of one block's alignment.

    Args:
        matched: (m,) int source position per target position (-1 = none).
        tgt_special: optional (m,) bool control tokens of the target; positions predicting
            one are not counted as predictive.

    Returns:
        The block's ``AlignStats``.
    """
    matched = np.asarray(matched)
    m = len(matched)
    predictive = np.zeros(m, bool)
    predictive[:-1] = True
    if tgt_special is not None:
        sp = np.asarray(tgt_special, bool)
        predictive[:-1] &= ~sp[1:]
    hit = matched >= 0
    nxt = np.append(matched[1:], -1)
    one = hit & (nxt >= 0) & (nxt == matched + 1)
    prev = np.concatenate([[-1], matched[:-1]])
    # After a source token that spans several target tokens, the previous target
    # position(s) inside it have no boundary of their own.
    many = hit & (prev < 0) & (np.arange(m) > 0)
    return AlignStats(
        positions=m,
        predictive=int(predictive.sum()),
        matched=int((hit & predictive).sum()),
        one_to_one=int((one & predictive).sum()),
        many_to_one=int((many & predictive).sum()),
    )
