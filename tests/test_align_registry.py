"""Method registries and alignment diagnostics."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fuselm.align import (  # noqa: E402
    ALIGN_METHODS,
    VOCAB_METHODS,
    alignment_stats,
    get_align_method,
    mined_dp_method,
    offsets_method,
    tokenize,
)
from fuselm.testing import build_tokenizer  # noqa: E402


def test_registries_are_explicit_and_described():
    assert set(ALIGN_METHODS) == {"offsets", "mined_dp"}
    assert get_align_method("offsets") is offsets_method
    assert get_align_method("mined_dp") is mined_dp_method
    for table in (ALIGN_METHODS, VOCAB_METHODS):
        for fn, desc in table.values():
            assert callable(fn) and ("arXiv" in desc or "SPEC" in desc)


def test_unknown_alignment_name_lists_valid_ones():
    with pytest.raises(ValueError, match="mined_dp, offsets"):
        get_align_method("dtw")


def test_offsets_method_needs_offsets():
    tok = build_tokenizer("bpe")
    t = tokenize(tok, "abc")
    bare = type(t)(ids=t.ids, offsets=None, surface=t.surface)
    with pytest.raises(ValueError, match="mined_dp"):
        offsets_method("abc", bare, t)
    assert mined_dp_method("abc", bare, bare).tolist()[:-1] == list(range(len(t.ids) - 1))


def test_alignment_stats_counts():
    #            0   1   2   3   4   5
    matched = np.array([0, 1, -1, 3, 4, -1])
    s = alignment_stats(matched)
    assert (s.positions, s.predictive, s.matched) == (6, 5, 4)
    # One-to-one: 0 (next 1 == 0+1), 3 (next 4 == 3+1). Position 1's next is -1.
    assert s.one_to_one == 2
    assert s.many_to_one == 1  # position 3 follows an unmatched position
    summary = (s + s).summary()
    assert summary["coverage"] == pytest.approx(0.8)
    assert summary["one_to_one_share"] == pytest.approx(0.4)
    sp = alignment_stats(matched, tgt_special=np.array([0, 0, 0, 0, 0, 1], bool))
    assert sp.predictive == 4 and sp.matched == 3  # position 4 predicts a control token
