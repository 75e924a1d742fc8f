"""Token alignment by dynamic programming over token strings (method ``mined_dp``).

FuseLLM (arXiv 2401.10491, section 3.3 and its released code) aligns the two
tokenizations of a text with dynamic time warping: the cost of pairing target token ``i``
with source token ``j`` is the edit distance between their strings, and the cheapest
monotone path through the (m x n) cost matrix pairs the tokens. It needs no offsets, so it
also serves tokenizers without offsets or with normalised text.

Two things differ from the research code (SPEC 3):

1. Speed: the cost matrix comes from rapidfuzz ``cdist`` (C++, threaded) and the DP runs
   along anti-diagonals, each one a handful of numpy operations, so a 2048 x 2048 block
   takes well under a second instead of ~5 s of Python per 2048 tokens.
2. Correctness of the position mapping: a *diagonal* step of the path from (i, j) to
   (i + 1, j + 1) says "target token i and source token j end together", i.e. target
   position i (predicting token i + 1) takes the source prediction made at position j.
   A run of target tokens paired with one source token therefore gives the teacher's
   prediction to the *last* sub-token, never the first. With ``verify=True`` (default)
   each such pairing is also checked against the text the two token prefixes spell
   (canonical form: NFKD, combining marks and control characters removed, case-folded;
   whitespace compared too when both tokenizers keep it). The DP is a heuristic and on
   repetitive text (runs of spaces, repeated digits) it can pair tokens whose prefixes
   differ; verification drops those pairs instead of training on misplaced predictions.
   ``verify=False`` keeps the paper's unverified behaviour (for ablations).

``[UNK]`` tokens are wildcards in the DP (cost 0). For verification, the text an ``[UNK]``
stands for is taken from the source tokens the path pairs with it alone; when that is
ambiguous, verification stops trusting the rest of that block (no further matches) rather
than guess.

The pairing check lives in ``verify.py``; the tokenization record in ``tokenseq.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fuselm.align.surface import to_text
from fuselm.align.tokenseq import TokenSeq, as_seq
from fuselm.align.verify import verify_pairs

__all__ = ["TokenSeq", "align_mined_dp", "dtw_path", "token_cost"]

_INF = np.int64(2**60)


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest monotone path through a cost matrix (DTW), vectorised by anti-diagonal.

    ``acc[i, j] = cost[i, j] + min(acc[i-1, j-1], acc[i-1, j], acc[i, j-1])``. All three
    predecessors lie on the two previous anti-diagonals, so one anti-diagonal is a few
    numpy operations on contiguous slices (each diagonal is stored on its own, padded
    with +inf at both ends, which also handles the matrix border). Ties prefer the
    diagonal, then (i-1, j), then (i, j-1): the path is deterministic.

    Args:
        cost: (m, n) non-negative integer costs.

    Returns:
        ``(rows, cols)``: int64 arrays of the path cells from (0, 0) to (m-1, n-1).
    """
    m, n = cost.shape
    if m == 0 or n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.ascontiguousarray(cost).ravel()
    if flat.dtype.kind not in "iu":
        raise TypeError(f"cost must be an integer matrix, got {flat.dtype}")
    item = flat.itemsize
    inf = np.array([_INF])
    lo = np.maximum(0, np.arange(m + n - 1) - (n - 1))  # first row on each diagonal
    hi = np.minimum(m - 1, np.arange(m + n - 1))  # last row
    moves: list[np.ndarray] = []  # 0 diagonal, 1 from (i-1, j), 2 from (i, j-1)
    pad2 = np.concatenate([inf, [0], inf])  # a virtual diagonal -1 holding acc = 0 at row 0
    lo2 = 0
    pad1 = np.concatenate([inf, [np.int64(flat[0])], inf])  # diagonal 0
    lo1 = 0
    moves.append(np.zeros(1, np.int8))
    for d in range(1, m + n - 1):
        a, z = lo[d], hi[d]
        # cost[i, d - i] for i in a..z: a strided view of the flat matrix, no gather.
        c = np.lib.stride_tricks.as_strided(
            flat[a * n + d - a :], shape=(z - a + 1,), strides=((n - 1) * item,)
        )
        diag = pad2[a - lo2 : z - lo2 + 1] if d >= 2 else np.full(z - a + 1, _INF)
        up = pad1[a - lo1 : z - lo1 + 1]
        left = pad1[a - lo1 + 1 : z - lo1 + 2]
        mv = (up < diag).view(np.int8)  # 1 where (i-1, j) is strictly better
        best = np.minimum(diag, up)
        take_left = left < best
        mv = np.where(take_left, np.int8(2), mv)
        best = np.minimum(best, left)
        moves.append(mv)
        pad2, lo2 = pad1, lo1
        pad1 = np.concatenate([inf, best + c, inf])
        lo1 = a
    # Backtrack: O(m + n) steps.
    rows, cols = [], []
    i, j = m - 1, n - 1
    while True:
        rows.append(i)
        cols.append(j)
        if i == 0 and j == 0:
            break
        step = moves[i + j][i - lo[i + j]]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.asarray(rows[::-1], np.int64), np.asarray(cols[::-1], np.int64)


def token_cost(tgt: list[str], src: list[str], workers: int = 1) -> np.ndarray:
    """(m, n) uint8 Levenshtein distances between token strings (rapidfuzz ``cdist``).

    Distances saturate at 255 (``score_cutoff``): one byte per cell keeps the matrix of
    a 2048 x 2048 block at 4 MB, which the DP then walks diagonally through the cache.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    if not tgt or not src:
        return np.zeros((len(tgt), len(src)), np.uint8)
    return process.cdist(
        tgt, src, scorer=Levenshtein.distance, dtype=np.uint8, score_cutoff=254, workers=workers
    )


def align_mined_dp(
    src_tokens: TokenSeq | Sequence[str | bytes],
    tgt_tokens: TokenSeq | Sequence[str | bytes],
    *,
    verify: bool = True,
    workers: int = 1,
) -> np.ndarray:
    """Align target positions to source positions by DTW over token strings.

    Args:
        src_tokens: source tokens (``TokenSeq`` or plain strings/bytes, which are taken
            as text tokens of a whitespace-keeping tokenizer).
        tgt_tokens: target tokens (same).
        verify: keep only pairings whose token prefixes spell the same canonical text
            (see the module docstring); False reproduces the paper's DP.
        workers: threads for the cost matrix.

    Returns:
        (m,) int64: the source position whose prediction target position ``i`` takes,
        -1 where none (always at the last position). Same contract as ``align_offsets``.
    """
    src, tgt = as_seq(src_tokens), as_seq(tgt_tokens)
    m = len(tgt)
    out = np.full(m, -1, np.int64)
    t_c = np.flatnonzero(~tgt.special)
    s_c = np.flatnonzero(~src.special)

    # Leading control tokens (BOS) predict the first text token on both sides.
    t_lead = _leading_special(tgt)
    s_lead = _leading_special(src)

    cand_t = np.zeros(0, np.int64)
    cand_s = np.zeros(0, np.int64)
    rows = cols = np.zeros(0, np.int64)
    if len(t_c) and len(s_c):
        t_str = [to_text(tgt.forms[i]) for i in t_c]
        s_str = [to_text(src.forms[i]) for i in s_c]
        cost = token_cost(t_str, s_str, workers)
        cost[tgt.unknown[t_c], :] = 0  # [UNK] is a wildcard
        cost[:, src.unknown[s_c]] = 0
        rows, cols = dtw_path(cost)
        diag = (np.diff(rows) == 1) & (np.diff(cols) == 1)
        cand_t, cand_s = rows[:-1][diag], cols[:-1][diag]
        # The next position must be the next text token (no EOS/SEP in between).
        ok = (t_c[cand_t] + 1 < m) & (s_c[cand_s] + 1 < len(src))
        ok &= _next_is_text(tgt, t_c[cand_t]) & _next_is_text(src, s_c[cand_s])
        cand_t, cand_s = cand_t[ok], cand_s[ok]

    if not verify:
        out[t_c[cand_t]] = s_c[cand_s]
        if t_lead >= 0 and s_lead >= 0:
            out[t_lead] = s_lead
        return out

    verify_pairs(tgt, src, t_c, s_c, rows, cols, cand_t, cand_s, t_lead, s_lead, out)
    return out


def _leading_special(seq: TokenSeq) -> int:
    """Last position of the leading run of control tokens, if text follows it, else -1."""
    n = 0
    while n < len(seq) and seq.special[n]:
        n += 1
    return n - 1 if 0 < n < len(seq) else -1


def _next_is_text(seq: TokenSeq, pos: np.ndarray) -> np.ndarray:
    nxt = np.minimum(pos + 1, len(seq) - 1)
    return (pos + 1 < len(seq)) & ~seq.special[nxt]
