"""Offset alignment: the traps of SPEC 3b, one by one, on hand-made and fixture offsets."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fuselm.align import (  # noqa: E402
    align_offsets,
    fallback_targets,
    offsets_cover_text,
    offsets_method,
    token_boundaries,
    tokenize,
)
from fuselm.testing import build_tokenizer  # noqa: E402

TOKS = {f: build_tokenizer(f) for f in ("bpe", "spm", "wordpiece", "wordpiece_lower")}


def arr(*offs):
    return np.array(offs, np.int64).reshape(-1, 2)


def align(text, src, tgt, src_special=None, tgt_special=None, src_nb=None, tgt_nb=None):
    src_special = np.zeros(len(src), bool) if src_special is None else np.array(src_special)
    tgt_special = np.zeros(len(tgt), bool) if tgt_special is None else np.array(tgt_special)
    return align_offsets(
        src, tgt, src_special, tgt_special, text=text, src_nbytes=src_nb, tgt_nbytes=tgt_nb
    ).tolist()


def test_many_to_one_goes_to_the_last_sub_token():
    text = "The quick brown"
    # Target splits "quick" in two; the source keeps it whole.
    tgt = arr((0, 3), (3, 7), (7, 9), (9, 15))  # The | " qui" | "ck" | " brown"
    src = arr((0, 3), (3, 9), (9, 15))  # The | " quick" | " brown"
    # Target position 2 ("ck") predicts " brown": it takes the source prediction made
    # at " quick" (position 1). Position 1 (" qui", predicting "ck") has no teacher.
    assert align(text, src, tgt) == [0, -1, 1, -1]


def test_many_to_one_on_fixture_tokenizers():
    text = "The quick brown fox"
    t = tokenize(TOKS["bpe"], text)
    s = tokenize(TOKS["spm"], text)
    tp = TOKS["bpe"].convert_ids_to_tokens(t.ids.tolist())
    sp = TOKS["spm"].convert_ids_to_tokens(s.ids.tolist())
    assert tp[:3] == ["The", "Ġqu", "ick"] and "▁quick" in sp
    m = offsets_method(text, s, t)
    assert m[tp.index("ick")] == sp.index("▁quick")
    assert m[tp.index("Ġqu")] == -1
    assert m[0] == sp.index("▁The")


def test_end_offsets_make_leading_space_conventions_irrelevant():
    text = "a b c"
    trimmed = arr((0, 1), (2, 3), (4, 5))  # byte-level BPE with trimmed offsets
    kept = arr((0, 1), (1, 3), (3, 5))  # SentencePiece keeps the space inside "▁b"
    dropped = arr((0, 1), (2, 3), (4, 5))  # WordPiece drops whitespace
    assert align(text, kept, trimmed) == [0, 1, -1]
    assert align(text, dropped, kept) == [0, 1, -1]


def test_bare_space_prediction_never_matches_a_word_prediction():
    text = "a  b"
    wordpiece = arr((0, 1), (3, 4))  # predicts the word "b" after "a"
    bytelevel = arr((0, 1), (1, 2), (2, 4))  # "a" | " " | " b": predicts a bare space
    assert align(text, bytelevel, wordpiece) == [-1, -1]
    assert align(text, wordpiece, bytelevel) == [-1, -1, -1]
    spm = arr((0, 1), (1, 2), (2, 4))  # "▁a" | "▁" | "▁b": same whitespace structure
    assert align(text, spm, bytelevel) == [0, 1, -1]


def test_split_character_only_its_last_piece_has_a_boundary():
    text = "東x"  # 東 is three UTF-8 bytes
    pieces = arr((0, 1), (0, 1), (1, 2))  # two byte-level pieces of 東, then x
    whole = arr((0, 1), (1, 2))
    b = token_boundaries(text, pieces, np.zeros(3, bool), np.array([2, 1, 1]))
    assert b.boundary.tolist() == [2, 3, -1]  # bytes: inside 東, after 東, end
    assert align(text, whole, pieces, src_nb=[3, 1], tgt_nb=[2, 1, 1]) == [-1, 0, -1]
    # A byte-fallback tokenizer splitting 東 at the same byte does share that boundary.
    bytes3 = arr((0, 1), (0, 1), (0, 1), (1, 2))
    got = align(text, bytes3, pieces, src_nb=[1, 1, 1, 1], tgt_nb=[2, 1, 1])
    assert got == [1, 2, -1]
    # Without byte counts no inner boundary is guessed.
    assert align(text, bytes3, pieces) == [-1, 2, -1]


def test_bos_predicts_first_token_and_eos_never_matches():
    text = "ab c"
    tgt = arr((0, 0), (0, 2), (2, 4), (0, 0))  # BOS ab " c" EOS
    tgt_sp = [True, False, False, True]
    src = arr((0, 0), (0, 1), (1, 2), (2, 4))  # BOS a b " c"
    src_sp = [True, False, False, False]
    # BOS<->BOS (both predict the first text token); "ab"<->"b"; " c" predicts EOS: none.
    assert align(text, src, tgt, src_sp, tgt_sp) == [0, 2, -1, -1]
    no_bos = arr((0, 1), (1, 2), (2, 4))
    assert align(text, no_bos, tgt, None, tgt_sp) == [-1, 1, -1, -1]


def test_zero_width_prefix_piece_after_bos():
    # SentencePiece "Hi" -> <s> "▁" <0x48> "i": the prepended "▁" overlaps "H".
    t = tokenize(TOKS["spm"], "Hi")
    assert TOKS["spm"].convert_ids_to_tokens(t.ids.tolist())[:2] == ["<s>", "▁"]
    b = token_boundaries("Hi", t.offsets, t.special(), t.surface.text_nbytes()[t.ids])
    assert b.boundary.tolist()[:3] == [0, 0, 1]
    assert b.reach.tolist()[:2] == [False, True]  # BOS predicts the bare "▁"
    # A target with BOS predicting "H" directly takes the prediction made at "▁".
    tgt = arr((0, 0), (0, 1), (1, 2))
    got = align_offsets(
        t.offsets,
        tgt,
        t.special(),
        np.array([True, False, False]),
        text="Hi",
        src_nbytes=t.surface.text_nbytes()[t.ids],
    )
    assert got.tolist() == [1, 2, -1]


def test_fallback_is_the_next_token_never_the_current_one():
    tgt_ids = np.array([11, 12, 13, 14])
    matched = np.array([-1, 0, -1, -1])
    nxt, use, has = fallback_targets(tgt_ids, matched)
    assert nxt.tolist() == [12, 13, 14, -1]
    assert use.tolist() == [True, False, True, False]
    assert has.tolist() == [True, True, True, False]
    assert not (nxt[use] == tgt_ids[use]).any()
    with pytest.raises(ValueError):
        fallback_targets(tgt_ids, matched[:2])


def test_normalising_tokenizer_is_detected():
    text = "Café au lait"
    lower = tokenize(TOKS["wordpiece_lower"], text)
    ok, examples = offsets_cover_text(text, lower.offsets, lower.ids, lower.surface)
    assert not ok and examples[0][1:] == ("cafe", "Café")
    for fam in ("bpe", "spm", "wordpiece"):
        t = tokenize(TOKS[fam], text)
        assert offsets_cover_text(text, t.offsets, t.ids, t.surface) == (True, [])


def test_text_normalised_away_moves_the_boundary_behind_it():
    # wordpiece_lower strips the combining accent: "e" (16,17) then "x" (18,19) in "e\u0301 x".
    text = "e\u0301 x"
    lower = tokenize(TOKS["wordpiece_lower"], text)
    b = token_boundaries(text, lower.offsets, lower.special(), None)
    assert b.boundary[0] == len("e\u0301".encode())
    bpe = tokenize(TOKS["bpe"], text)
    m = offsets_method(text, bpe, lower)
    # Matched only with a source position that has read the accent as well.
    assert (m >= 0).any()
    for j in m[m >= 0].tolist():
        assert bpe.offsets[j, 1] == 2


def test_offsets_from_another_text_are_refused():
    with pytest.raises(ValueError, match="content hash"):
        align("ab", arr((0, 1), (1, 5)), arr((0, 2)))
