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
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fuselm.align.surface import WORDPIECE, VocabSurface, is_bert_punctuation, is_cjk, to_text

_INF = np.int64(2**60)
_OPAQUE = b"\xff\xff"  # an [UNK] paired 1:1 with an [UNK]: same unknown text on both sides


@dataclass(frozen=True)
class TokenSeq:
    """One tokenization of a block, as the DP needs it.

    Attributes:
        forms: normalised surface bytes per position (``VocabSurface.forms``; ``b""`` for
            control tokens). ``str`` items are UTF-8 encoded.
        special: (n,) bool control tokens without text (BOS, EOS, padding).
        unknown: (n,) bool tokens that stand for text the tokenizer did not keep
            (``[UNK]``); wildcards in the DP.
        keeps_whitespace: the tokens carry the text's whitespace (False for WordPiece).
        adds_prefix_space: the tokenizer prepends a space the text may not have.
        tokenizer: fingerprint of the tokenizer, if known. Two sequences from the same
            tokenizer may trust equal ``[UNK]`` tokens to hide equal text.
        unk_is_word: an ``[UNK]`` replaces exactly one whole pre-tokenized word
            (WordPiece); only then can the text it hides be read off the other side.
    """

    forms: list[bytes]
    special: np.ndarray = field(default=None)  # type: ignore[assignment]
    unknown: np.ndarray = field(default=None)  # type: ignore[assignment]
    keeps_whitespace: bool = True
    adds_prefix_space: bool = False
    tokenizer: str | None = None
    unk_is_word: bool = False

    def __post_init__(self) -> None:
        """Normalise types and fill default masks."""
        forms = [f.encode("utf-8") if isinstance(f, str) else bytes(f) for f in self.forms]
        object.__setattr__(self, "forms", forms)
        n = len(forms)
        for name in ("special", "unknown"):
            v = getattr(self, name)
            v = np.zeros(n, bool) if v is None else np.asarray(v, bool)
            if v.shape != (n,):
                raise ValueError(f"{name} has shape {v.shape}, expected ({n},)")
            object.__setattr__(self, name, v)

    def __len__(self) -> int:
        """Number of positions."""
        return len(self.forms)

    @classmethod
    def from_ids(
        cls, ids: np.ndarray, surface: VocabSurface, offsets: np.ndarray | None = None
    ) -> TokenSeq:
        """Build from token ids and the tokenizer's ``VocabSurface``.

        Args:
            ids: (n,) int token ids.
            surface: the tokenizer's surface forms.
            offsets: optional (n, 2) offsets; a special token covering text (a literal
                ``<|endoftext|>``) then counts as text. Without offsets every special
                token except ``[UNK]`` is a control token.
        """
        ids = np.asarray(ids, np.int64)
        unknown = surface.is_unknown(ids)
        special = surface.special[ids] & ~unknown
        if offsets is not None:
            off = np.asarray(offsets).reshape(-1, 2)
            special &= off[:, 1] <= off[:, 0]
        forms = surface.forms
        pieces = [forms[i] if not special[k] else b"" for k, i in enumerate(ids.tolist())]
        # A special token that covers text contributes its literal spelling.
        for k in np.flatnonzero(surface.special[ids] & ~special & ~unknown):
            pieces[k] = surface.pieces[ids[k]].encode("utf-8")
        return cls(
            forms=pieces,
            special=special,
            unknown=unknown,
            keeps_whitespace=surface.info.keeps_whitespace,
            adds_prefix_space=surface.info.adds_prefix_space,
            tokenizer=surface.fingerprint,
            unk_is_word=surface.info.family == WORDPIECE,
        )


def _as_seq(x: TokenSeq | Sequence[str | bytes]) -> TokenSeq:
    return x if isinstance(x, TokenSeq) else TokenSeq(forms=list(x))


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
    src, tgt = _as_seq(src_tokens), _as_seq(tgt_tokens)
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
