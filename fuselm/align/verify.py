"""Checking DTW pairings against the text the two token prefixes spell.

The DP of ``dtw.py`` is a heuristic: on repetitive text (runs of spaces, repeated digits)
it can pair a target token with a source token whose prefixes cover different text, and
training on such a pairing teaches the target a prediction made at another place. A
pairing is kept only when both prefixes spell the same *canonical* text (NFKD, combining
marks and control characters removed, case-folded; whitespace compared too when both
tokenizers keep it), and when the text after the boundary agrees through the next token.

``[UNK]`` tokens hide their text: it is read off the source tokens the path pairs with it
alone; when that is ambiguous, verification stops trusting the rest of the block (no
further matches) rather than guess.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

from fuselm.align.surface import is_bert_punctuation, is_cjk, to_text
from fuselm.align.tokenseq import TokenSeq

_OPAQUE = b"\xff\xff"  # an [UNK] paired 1:1 with an [UNK]: same unknown text on both sides


def verify_pairs(
    tgt: TokenSeq,
    src: TokenSeq,
    t_c: np.ndarray,
    s_c: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    cand_t: np.ndarray,
    cand_s: np.ndarray,
    t_lead: int,
    s_lead: int,
    out: np.ndarray,
) -> None:
    """Keep the DP's proposed pairings whose token prefixes spell the same text; fill ``out``.

    Args:
        tgt: the target tokenization.
        src: the source tokenization.
        t_c: positions of the target's text (non-control) tokens.
        s_c: positions of the source's text tokens.
        rows: DTW path rows (indices into ``t_c``).
        cols: DTW path columns (indices into ``s_c``).
        cand_t: target side of the path's diagonal steps (indices into ``t_c``).
        cand_s: source side of the same steps (indices into ``s_c``).
        t_lead: last leading control position of the target, or -1.
        s_lead: last leading control position of the source, or -1.
        out: (m,) int64 target-to-source map, written in place.
    """
    if len(t_c) and len(s_c):
        t_sub, s_sub = _unknown_texts(tgt, src, t_c, s_c, rows, cols)
    else:
        t_sub, s_sub = {}, {}
    ws_free = not (tgt.keeps_whitespace and src.keeps_whitespace)
    t_strip, s_strip = _prefix_space_strips(tgt, src, t_c, s_c, ws_free)
    t_prefix = _prefixes(tgt, t_c, t_sub, t_strip, ws_free, poison=b"\xff\xfeT")
    s_prefix = _prefixes(src, s_c, s_sub, s_strip, ws_free, poison=b"\xff\xfeS")
    lcp = _common_prefix(t_prefix.canon, s_prefix.canon)

    # Pairings the DP proposes, checked against the canonical text.
    tl, sl = t_prefix.length[cand_t], s_prefix.length[cand_s]
    tp, sp = t_prefix.pending[cand_t], s_prefix.pending[cand_s]
    good = (tl == sl) & (tp == sp) & (tl > 0)
    # The texts must agree beyond the boundary too, through the next token on both sides:
    # a boundary right after an [UNK] whose text was read off the DP agrees by
    # construction, only what follows can confirm (or refute) that reading.
    t_next = t_prefix.length[np.minimum(cand_t + 1, len(t_c) - 1)]
    s_next = s_prefix.length[np.minimum(cand_s + 1, len(s_c) - 1)]
    at_end = (tl == len(t_prefix.canon)) & (sl == len(s_prefix.canon))
    good &= (lcp >= np.maximum(t_next, s_next)) & ((lcp > tl) | at_end)
    good &= t_prefix.ok[cand_t] & s_prefix.ok[cand_s]
    good &= t_prefix.reach[cand_t] == s_prefix.reach[cand_s]
    if (tp > 0).any():  # a split character: the pending bytes must be the same bytes
        for k in np.flatnonzero(good & (tp > 0)):
            good[k] = t_prefix.pending_bytes(cand_t[k]) == s_prefix.pending_bytes(cand_s[k])
    # Identical token prefixes cover identical text whatever the canonical form says
    # (an identical tokenizer is aligned to itself, inside whitespace runs included).
    ident = _identical_prefix(tgt, src)
    tpos, spos = t_c[cand_t], s_c[cand_s]
    good |= (tpos == spos) & (tpos + 1 < ident)
    out[tpos[good]] = spos[good]

    # Boundaries at the very start of the text (BOS, zero-width prefix tokens): pair
    # them by "does the next token reach text", last with last.
    t_zero = _start_positions(tgt, t_c, t_prefix, t_lead)
    s_zero = _start_positions(src, s_c, s_prefix, s_lead)
    for reach in (False, True):
        a = [p for p, r in t_zero if r == reach]
        b = [p for p, r in s_zero if r == reach]
        for pa, pb in zip(a[::-1], b[::-1], strict=False):
            out[pa] = pb


def _unknown_texts(
    tgt: TokenSeq,
    src: TokenSeq,
    t_c: np.ndarray,
    s_c: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
) -> tuple[dict[int, bytes | None], dict[int, bytes | None]]:
    """Text each [UNK] stands for, read off the tokens the DP pairs with it alone.

    A DP wildcard can swallow too much or too little, and on repetitive text the texts
    after it may still agree, so the reading is accepted only where the tokenizer
    guarantees what an [UNK] covers: WordPiece replaces exactly one pre-tokenized word
    (a run between whitespace/punctuation, or one punctuation mark, or one CJK
    ideograph) by [UNK]. The partner text must be exactly such a word, delimited on both
    sides in the other tokenization. Anything else is ambiguous (None).

    Returns:
        Per side, a dict text-token index -> bytes, or None where ambiguous.
    """

    def fill(
        seq: TokenSeq,
        own_c: np.ndarray,
        other: TokenSeq,
        other_c: np.ndarray,
        own: np.ndarray,
        oth: np.ndarray,
    ) -> dict[int, bytes | None]:
        # A path cell (u, p) is the only cell of partner p iff p occurs once in ``oth``.
        once = np.bincount(oth, minlength=len(other_c)) == 1
        other_unk = other.unknown[other_c]
        sub: dict[int, bytes | None] = {}
        for u in np.flatnonzero(seq.unknown[own_c]).tolist():
            partners = oth[own == u]
            sub[u] = None
            if not seq.unk_is_word or not once[partners].all():
                continue
            if len(partners) == 1 and other_unk[partners[0]]:
                if other.unk_is_word:  # one whole word on both sides: the same word
                    sub[u] = _OPAQUE
                continue
            if other_unk[partners].any():
                continue
            a, z = int(partners.min()), int(partners.max())
            text = b"".join(other.forms[other_c[p]] for p in range(a, z + 1))
            before = _neighbour(other, other_c, a, -1)
            after = _neighbour(other, other_c, z, +1)
            if before is not None and after is not None and _is_word(text, before, after):
                sub[u] = text
        return sub

    t_sub = fill(tgt, t_c, src, s_c, rows, cols) if tgt.unknown[t_c].any() else {}
    s_sub = fill(src, s_c, tgt, t_c, cols, rows) if src.unknown[s_c].any() else {}
    return t_sub, s_sub


def _neighbour(seq: TokenSeq, c_idx: np.ndarray, k: int, step: int) -> str | None:
    """The character next to text token k (step -1: before it, +1: after it).

    Returns "" at the start/end of the block and None when the neighbour is unknown.
    """
    k += step
    while 0 <= k < len(c_idx):
        i = c_idx[k]
        if seq.unknown[i]:
            return None
        txt = to_text(seq.forms[i])
        if txt:
            return txt[-1] if step < 0 else txt[0]
        k += step
    return ""


def _delimits(ch: str) -> bool:
    """A character BERT's pre-tokenizer always splits at (whitespace, punct., CJK)."""
    return ch == "" or ch.isspace() or is_bert_punctuation(ch) or is_cjk(ch)


def _is_word(raw: bytes, before: str, after: str) -> bool:
    """``raw`` (plus surrounding whitespace) is one whole BERT pre-token in context."""
    txt = to_text(raw)
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in txt):
        return False  # cuts through a character
    core = txt.strip()
    if not core:
        return False
    if txt[0].isspace():
        before = txt[0]
    if txt[-1].isspace():
        after = txt[-1]
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in (before + after)):
        return False  # removed by BERT's cleaning: cannot tell where the word ends
    if len(core) == 1 and (is_bert_punctuation(core) or is_cjk(core)):
        return True  # split off whatever surrounds it
    if any(_delimits(c) for c in core):
        return False
    return _delimits(before) and _delimits(after)


def _prefix_space_strips(
    tgt: TokenSeq, src: TokenSeq, t_c: np.ndarray, s_c: np.ndarray, ws_free: bool
) -> tuple[bool, bool]:
    """Whether to drop the space a prefix-space tokenizer put before the first token.

    SentencePiece with ``prepend_scheme`` spells "x" and " x" both as ``▁x``. Against a
    tokenizer that keeps the text's leading whitespace verbatim we can tell which it was:
    if that one's text does not start with a space, the ``▁`` was added.
    """
    if ws_free or tgt.adds_prefix_space == src.adds_prefix_space:
        return False, False

    def starts_with_space(seq: TokenSeq, c: np.ndarray) -> bool:
        # Only a space stops the prepending ("\n" does not), as in Metaspace.
        for k in range(len(c)):
            f = seq.forms[c[k]]
            if f:
                return f.startswith(b" ")
        return False

    if tgt.adds_prefix_space:
        return not starts_with_space(src, s_c), False
    return False, not starts_with_space(tgt, t_c)


@dataclass
class _Prefixes:
    """Per text token of one side: what the prefix up to and including it spells."""

    canon: np.ndarray  # (L,) uint32 code points of the canonical text of the whole side
    length: np.ndarray  # (k,) canonical length of the prefix (complete characters)
    pending: np.ndarray  # (k,) bytes of a character split at the boundary
    ok: np.ndarray  # (k,) the boundary is unambiguous in canonical coordinates
    reach: np.ndarray  # (k,) the NEXT token holds non-whitespace text
    has_text: np.ndarray  # (k,) the token itself holds non-whitespace text
    raw: bytes  # concatenated raw bytes
    ends: np.ndarray  # (k,) byte end per token in ``raw``

    def pending_bytes(self, k: int) -> bytes:
        """The bytes of the split character that belong to the prefix of token k."""
        e = int(self.ends[k])
        return self.raw[e - int(self.pending[k]) : e]


_CANON_CACHE: dict[tuple[str, bool], str] = {}


def _canon(ch: str, ws_free: bool) -> str:
    """Canonical spelling of one character (empty: ignored for comparison)."""
    key = (ch, ws_free)
    hit = _CANON_CACHE.get(key)
    if hit is not None:
        return hit
    if 0xDC80 <= ord(ch) <= 0xDCFF:  # a stray byte of a split character
        out = ch
    elif ch.isspace():
        out = "" if ws_free else unicodedata.normalize("NFKD", ch)
    elif unicodedata.category(ch) in ("Cc", "Cf"):
        out = ""  # control/format characters: tokenizers drop them (BERT clean_text)
    else:
        d = unicodedata.normalize("NFKD", ch)
        out = "".join(x for x in d if unicodedata.category(x) != "Mn").casefold()
    if len(_CANON_CACHE) < 200_000:
        _CANON_CACHE[key] = out
    return out


def _prefixes(
    seq: TokenSeq,
    c_idx: np.ndarray,
    sub: dict[int, bytes | None],
    strip_first: bool,
    ws_free: bool,
    poison: bytes,
) -> _Prefixes:
    """Canonical prefix measures at every text-token boundary of one side."""
    pieces = []
    stripped = False
    for k, i in enumerate(c_idx.tolist()):
        if seq.unknown[i]:
            # Unknown text we cannot reconstruct: a side-specific poison makes the two
            # canonical texts differ from here on, so no later pairing verifies.
            piece = sub.get(k)
            pieces.append(poison if piece is None else piece)
            continue
        f = seq.forms[i]
        if strip_first and not stripped and f:
            if f.startswith(b" "):
                f = f[1:]
            stripped = True
        pieces.append(f)
    nb = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    ends = np.cumsum(nb)
    raw = b"".join(pieces)
    text = to_text(raw)
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    esc = (cps >= 0xDC80) & (cps <= 0xDCFF)
    cbytes = np.where(
        esc, 1, 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    )
    char_end = np.cumsum(cbytes)
    canon_parts = [_canon(ch, ws_free) for ch in text]
    clen = np.fromiter((len(p) for p in canon_parts), np.int64, len(canon_parts))
    canon_cum = np.concatenate([[0], np.cumsum(clen)])
    canon = np.frombuffer("".join(canon_parts).encode("utf-32-le", "surrogatepass"), np.uint32)
    is_ws = np.fromiter((ch.isspace() for ch in text), bool, len(text))
    ignored = (clen == 0) & ~is_ws  # combining marks, control characters

    nchar = np.searchsorted(char_end, ends, side="right")  # complete chars in the prefix
    pending = ends - np.concatenate([[0], char_end])[nchar]
    length = canon_cum[nchar]
    # A boundary right before an ignored character has the same canonical prefix as the
    # one right after it: only the latter is unambiguous. Without whitespace in the
    # comparison, "right before" looks past whitespace too.
    look = np.arange(len(text) + 1)
    if ws_free:
        look = np.where(np.append(is_ws, False), len(text), look)
        look = np.minimum.accumulate(look[::-1])[::-1]
    ok = (pending > 0) | ~np.append(ignored, False)[look[nchar]]
    if ws_free:
        # Without whitespace in the comparison, only the boundary right after text is
        # unambiguous (WordPiece's only kind of boundary).
        ok &= (pending > 0) | ~np.concatenate([[True], is_ws])[nchar]
    has_text = np.fromiter(
        (bool(p) and not to_text(p).isspace() for p in pieces), bool, len(pieces)
    )
    reach = np.append(has_text[1:], False)
    return _Prefixes(canon, length, pending, ok, reach, has_text, raw, ends)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _identical_prefix(tgt: TokenSeq, src: TokenSeq) -> int:
    """Number of leading positions where both sides hold the same token."""
    same_tok = tgt.tokenizer is not None and tgt.tokenizer == src.tokenizer
    n = 0
    for a, b, sa, sb, ua, ub in zip(
        tgt.forms, src.forms, tgt.special, src.special, tgt.unknown, src.unknown, strict=False
    ):
        if a != b or sa != sb or ua != ub or ((ua or ub) and not same_tok):
            break
        n += 1
    return n


def _start_positions(
    seq: TokenSeq, c_idx: np.ndarray, pre: _Prefixes, lead: int
) -> list[tuple[int, bool]]:
    """Positions whose boundary is the start of the text, with their reach flag."""
    out: list[tuple[int, bool]] = []
    if lead >= 0 and len(c_idx) and c_idx[0] == lead + 1:
        out.append((lead, bool(pre.has_text[0])))
    # Zero-width text tokens at the start (a stripped prefix "▁").
    k = 0
    while k < len(c_idx) - 1 and pre.ends[k] == 0:
        pos = int(c_idx[k])
        if c_idx[k + 1] == pos + 1:
            out.append((pos, bool(pre.reach[k])))
        k += 1
    return out
