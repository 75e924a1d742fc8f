"""Property tests of token alignment on random text, for every ordered pair of families.

The oracle below is deliberately independent of the code under test: it rebuilds what
each model has read from the token *strings* (not from offsets, except for the text an
``[UNK]`` hides) and checks every matched pair against it.
"""

from __future__ import annotations

import os
import unicodedata

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuselm.align import alignment_stats, mined_dp_method, offsets_method, tokenize  # noqa: E402
from fuselm.testing import FAMILIES, FIXTURE_TEXTS, build_tokenizer  # noqa: E402

TOKS = {f: build_tokenizer(f) for f in FAMILIES}
PAIRS = [(t, s) for t in FAMILIES for s in FAMILIES]
LOSSLESS = {"bpe", "spm"}  # keep every byte of the text (spm may add one prefix space)

# Pieces of text that break aligners: accents (precomposed and combining), CJK, Hangul,
# emoji with modifiers and ZWJ, digits, runs of spaces, tabs, newlines, code symbols.
FRAGMENTS = [
    "the",
    "The",
    "quick",
    "fox",
    "dog",
    "fibonacci",
    "return",
    "def",
    "self",
    "Café",
    "naïve",
    "e\u0301",
    "a\u0308",
    "東京",
    "日本",
    "北京",
    "서울",
    "🙂",
    "🚀",
    "👍🏽",
    "🇫🇷",
    "👨\u200d👩",
    "∑",
    "x²",
    "→",
    "12",
    "1234567",
    "3.14",
    "0",
    "(",
    ")",
    ":",
    ",",
    ".",
    "'",
    "$",
    "#",
    "_",
    "=",
    "+",
    "-",
    "\n",
    "\t",
    " ",
    "  ",
    "    ",
    "\n\n",
    " \n",
    "\u00a0",
    "Ω",
    "ß",
    "İ",
]
texts = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=14).map("".join) | st.text(
    alphabet=st.sampled_from(list("ab xyz\n\t  09éü東🙂\u0301.,")), min_size=1, max_size=30
)
SETTINGS = settings(
    max_examples=int(os.environ.get("FUSELM_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    database=None,  # keep the checkout clean: no .hypothesis/ directory
    suppress_health_check=[HealthCheck.too_slow],
)


def canon(s: str) -> str:
    """Whitespace-free canonical text: NFKD, no combining marks or controls, casefold."""
    out = []
    for ch in s:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(ch)
            continue
        d = unicodedata.normalize("NFKD", ch)
        out.append("".join(x for x in d if unicodedata.category(x) != "Mn").casefold())
    return "".join(out)


class Side:
    """What a tokenization has read before each position, rebuilt from token strings."""

    def __init__(self, family: str, text: str):
        self.family = family
        self.tok = tokenize(TOKS[family], text)
        self.text = text
        surf = self.tok.surface
        self.special = self.tok.special()
        pieces: list[bytes] = []
        for k, i in enumerate(self.tok.ids.tolist()):
            if self.special[k]:
                pieces.append(b"")
            elif surf.unk_id is not None and i == surf.unk_id:
                s, e = self.tok.offsets[k]
                pieces.append(text[s:e].encode())  # [UNK]: the only use of offsets
            else:
                pieces.append(surf.forms[i])
        # SentencePiece prepends "▁" unless the text already starts with a space.
        if surf.info.adds_prefix_space and not text.startswith(" "):
            for k, p in enumerate(pieces):
                if p:
                    pieces[k] = p[1:] if p.startswith(b" ") else p
                    break
        self.pieces = pieces

    def raw_prefix(self, i: int) -> bytes:
        """Bytes of text read up to and including position i."""
        return b"".join(self.pieces[: i + 1])

    def canon_prefix(self, i: int) -> str:
        """Canonical text of the complete characters read up to position i."""
        raw = self.raw_prefix(i)
        txt = raw.decode("utf-8", "surrogateescape")
        while txt and 0xDC80 <= ord(txt[-1]) <= 0xDCFF:  # drop a split character's head
            txt = txt[:-1]
        return canon(txt)

    def next_reaches_text(self, i: int) -> bool:
        nxt = self.pieces[i + 1]
        return bool(nxt) and not nxt.decode("utf-8", "surrogateescape").isspace()

    def next_start_canon(self, i: int) -> str:
        """Canonical text before the start of token i+1 (in the raw text, by offsets)."""
        return canon(self.text[: self.tok.offsets[i + 1, 0]])


def check_pairs(tgt: Side, src: Side, matched: np.ndarray) -> None:
    m, n = len(tgt.tok.ids), len(src.tok.ids)
    assert matched.shape == (m,) and matched.dtype == np.int64
    assert ((matched == -1) | ((matched >= 0) & (matched < n))).all()
    if m:
        assert matched[-1] == -1  # the last position predicts nothing
    for i in np.flatnonzero(matched >= 0).tolist():
        j = int(matched[i])
        ctx = (tgt.family, src.family, i, j, tgt.text)
        assert j < n - 1, ctx  # the source's last position predicts nothing usable
        assert not tgt.special[i + 1] and not src.special[j + 1], ctx  # never EOS
        # Both models have read the same text ...
        assert tgt.canon_prefix(i) == src.canon_prefix(j), ctx
        if tgt.family in LOSSLESS and src.family in LOSSLESS:
            assert tgt.raw_prefix(i) == src.raw_prefix(j), ctx  # ... byte for byte
        # ... and both next tokens start right there, nothing but whitespace skipped.
        if not tgt.special[i] and not src.special[j]:
            assert tgt.next_start_canon(i) == tgt.canon_prefix(i) or _split_char(tgt, i), ctx
            assert src.next_start_canon(j) == src.canon_prefix(j) or _split_char(src, j), ctx
        assert tgt.next_reaches_text(i) == src.next_reaches_text(j), ctx


def _split_char(side: Side, i: int) -> bool:
    """Position i ends inside a character (offsets of i and i+1 overlap)."""
    return bool(side.tok.offsets[i + 1, 0] < side.tok.offsets[i, 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_tokenizers_give_identity(family):
    for text in [*FIXTURE_TEXTS, "".join(FIXTURE_TEXTS)]:
        side = Side(family, text)
        expect = np.arange(len(side.tok.ids))
        expect[-1] = -1
        for method in (offsets_method, mined_dp_method):
            got = method(text, side.tok, side.tok)
            assert (got == expect).all(), (family, method.__name__, text)
            assert alignment_stats(got).summary()["coverage"] == 1.0


@SETTINGS
@given(text=texts)
def test_offsets_pairs_share_boundaries(text):
    sides = {f: Side(f, text) for f in FAMILIES}
    for tf, sf in PAIRS:
        matched = offsets_method(text, sides[sf].tok, sides[tf].tok)
        check_pairs(sides[tf], sides[sf], matched)


@SETTINGS
@given(text=texts)
def test_mined_dp_pairs_share_boundaries_and_agree_with_offsets(text):
    sides = {f: Side(f, text) for f in FAMILIES}
    for tf, sf in PAIRS:
        dp = mined_dp_method(text, sides[sf].tok, sides[tf].tok)
        check_pairs(sides[tf], sides[sf], dp)
        off = offsets_method(text, sides[sf].tok, sides[tf].tok)
        # Wherever both methods give a 1:1 match they give the same source position.
        one_off = (off[:-1] >= 0) & (off[1:] == off[:-1] + 1)
        one_dp = (dp[:-1] >= 0) & (dp[1:] == dp[:-1] + 1)
        both = np.flatnonzero(one_off & one_dp)
        assert (off[both] == dp[both]).all(), (tf, sf, text)
        # No tolerance needed: any position where both give a match agrees as well.
        both_any = (off >= 0) & (dp >= 0)
        assert (off[both_any] == dp[both_any]).all(), (tf, sf, text)
