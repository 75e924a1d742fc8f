"""DP alignment (mined_dp): the vectorised DTW against a plain reference, and the mapping."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fuselm.align import TokenSeq, align_mined_dp, dtw_path, mined_dp_method, tokenize  # noqa: E402
from fuselm.testing import build_tokenizer  # noqa: E402

TOKS = {f: build_tokenizer(f) for f in ("bpe", "spm", "wordpiece")}


def reference_dtw(cost: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """Textbook O(m n) DTW with the same tie order (diagonal, up, left)."""
    m, n = cost.shape
    acc = np.full((m + 1, n + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    path, i, j = [], m, n
    while True:
        path.append((i - 1, j - 1))
        if i == 1 and j == 1:
            break
        opts = [
            (acc[i - 1, j - 1], i - 1, j - 1),
            (acc[i - 1, j], i - 1, j),
            (acc[i, j - 1], i, j - 1),
        ]
        best = min(o[0] for o in opts)
        _, i, j = next(o for o in opts if o[0] == best)
    return float(acc[m, n]), path[::-1]


def test_vectorised_dtw_equals_reference():
    rng = np.random.default_rng(0)
    for _ in range(30):
        m, n = rng.integers(1, 12, size=2)
        cost = rng.integers(0, 4, size=(m, n))  # small range: many ties
        rows, cols = dtw_path(cost)
        total, path = reference_dtw(cost)
        assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == path
        assert cost[rows, cols].sum() == total


def test_identity_and_plain_string_api():
    toks = ["The", " quick", " brown", " fox"]
    assert align_mined_dp(toks, toks).tolist() == [0, 1, 2, -1]
    # Source splits " quick": target position 0 ("The" -> " quick") matches source 0;
    # target 1 (" quick" -> " brown") takes the prediction after the LAST piece "ck".
    src = ["The", " qui", "ck", " brown", " fox"]
    assert align_mined_dp(src, toks).tolist() == [0, 2, 3, -1]
    # Reverse: target "ck" is the last sub-token of the source's " quick".
    assert align_mined_dp(toks, src).tolist() == [0, -1, 1, 2, -1]


def test_verification_removes_dp_pairings_that_spell_different_text():
    # DTW pairs " ab" with " a" and "c" with "bc" 1:1 (cost 2 beats any other path), so
    # the unverified DP claims a shared boundary after " ab" / " a", which is false.
    src = [" a", "bc", " d"]
    tgt = [" ab", "c", " d"]
    raw = align_mined_dp(src, tgt, verify=False)
    assert raw.tolist() == [0, 1, -1]
    assert align_mined_dp(src, tgt).tolist() == [-1, 1, -1]


def test_fixture_pair_matches_offsets_where_both_match():
    text = "def fibonacci(n: int) -> int:\n    return n  # café 東京"
    for tf, sf in [("bpe", "spm"), ("spm", "wordpiece"), ("wordpiece", "bpe")]:
        t, s = tokenize(TOKS[tf], text), tokenize(TOKS[sf], text)
        from fuselm.align import offsets_method

        off = offsets_method(text, s, t)
        dp = mined_dp_method(text, s, t)
        both = (off >= 0) & (dp >= 0)
        assert both.sum() >= 5, (tf, sf)
        assert (off[both] == dp[both]).all()


def test_unknown_token_spans_are_recovered_for_wordpiece():
    text = "Hi there, Hi again"  # "Hi" is [UNK] for the fixture WordPiece (no capital H)
    wp = tokenize(TOKS["wordpiece"], text)
    bpe = tokenize(TOKS["bpe"], text)
    pieces = TOKS["wordpiece"].convert_ids_to_tokens(wp.ids.tolist())
    assert pieces.count("[UNK]") >= 2
    dp = mined_dp_method(text, bpe, wp)
    # The position after the first [UNK] ("Hi" -> " there") finds its teacher.
    k = pieces.index("[UNK]")
    assert dp[k] >= 0
    assert bpe.offsets[dp[k], 1] == 2


def test_token_seq_from_ids_marks_controls_and_unknowns():
    t = tokenize(TOKS["spm"], "ab")
    seq = TokenSeq.from_ids(t.ids, t.surface, t.offsets)
    assert seq.special.tolist()[0] is True and not seq.special[1:].any()
    assert seq.adds_prefix_space and seq.keeps_whitespace
    wp = tokenize(TOKS["wordpiece"], "Hi")
    seq = wp.token_seq()
    assert seq.unknown.tolist() == [True] and not seq.special.any() and seq.unk_is_word
