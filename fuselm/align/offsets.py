"""Token alignment from character offsets of the same text (method ``offsets``).

Position ``i`` of a causal LM predicts token ``i + 1``. A target position and a source
position are aligned when both models have read exactly the same text and their next
tokens start at the same place (SPEC 3, "token alignment"). We compare *ends*, not starts:
the boundary between tokens k and k+1 is the end of token k. Starts are not comparable
across families (SPEC 3b): byte-level BPE may trim the leading space out of ``Ġword``'s
offsets, SentencePiece keeps it in ``▁word``, WordPiece drops whitespace altogether.

Every boundary is measured in **bytes** of the UTF-8 text, because byte-level BPE (and
SentencePiece byte fallback) can end a token inside a character; Hugging Face then reports
the same or overlapping character offsets for all the pieces of that character. We find
such runs of overlapping tokens and place each inner boundary by subtracting the byte
lengths of the following pieces from the run's end, which is a real character boundary.
An inner boundary can only match a tokenizer that splits the same character at the same
byte (or an identical tokenizer), never one that keeps the character whole.

A match additionally requires that the two predicted tokens agree on whether they stop
inside the whitespace that follows the boundary or reach the text after it ("reach").
Without it, WordPiece (which predicts the next *word*, whitespace implied) would be
matched with a byte-level teacher that predicts a bare ``Ġ`` at the same end offset.

Everything is vectorised with numpy: no Python loop per token.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fuselm.align.surface import VocabSurface, to_text


def char_byte_offsets(text: str) -> np.ndarray:
    """Byte offset of every character boundary of ``text``.

    Args:
        text: the block text.

    Returns:
        (len(text) + 1,) int64; ``out[c]`` is the UTF-8 byte offset of character ``c``.
    """
    return text_index(text).cb


# Every code point for which str.isspace() is true lies at or below U+3000: a lookup
# table answers "is whitespace" for a whole text in one vectorised gather.
_WS_MAX = 0x3000
_WS_TABLE = np.fromiter((chr(c).isspace() for c in range(_WS_MAX + 1)), bool, _WS_MAX + 1)


def _whitespace_mask(cps: np.ndarray) -> np.ndarray:
    """(len(cps),) bool: ``str.isspace`` per code point."""
    return (cps <= _WS_MAX) & _WS_TABLE[np.minimum(cps, _WS_MAX)]


class TextIndex(NamedTuple):
    """Per-character tables of one block text, shared by both tokenizations."""

    n_chars: int
    cb: np.ndarray  # (L+1,) byte offset of each character boundary
    ws: np.ndarray  # (L,) whitespace per character
    next_text: np.ndarray  # (L+1,) first non-whitespace character at or after c (L if none)
    last_text: np.ndarray  # (L+1,) last non-whitespace character before c (-1 if none)
    nonws_cum: np.ndarray  # (L+1,) non-whitespace characters before c


def text_index(text: str) -> TextIndex:
    """Build the per-character tables of ``text`` (all vectorised)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = len(cps)
    nbytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    cb = np.zeros(n + 1, np.int64)
    np.cumsum(nbytes, out=cb[1:])
    ws = _whitespace_mask(cps)
    idx = np.arange(n + 1)
    nxt = np.where(np.append(ws, False), n, idx)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    last = np.maximum.accumulate(np.where(np.append(ws, True), -1, idx))
    last = np.concatenate([[-1], last[:-1]])
    nonws_cum = np.zeros(n + 1, np.int64)
    np.cumsum(~ws, out=nonws_cum[1:])
    return TextIndex(n, cb, ws, nxt, last, nonws_cum)


class Boundaries(NamedTuple):
    """Per position: where its prediction starts (see ``token_boundaries``)."""

    boundary: np.ndarray  # (n,) int64 byte offset, -1 = no usable prediction
    reach: np.ndarray  # (n,) bool next token extends past the following whitespace
    norm: np.ndarray  # (n,) int64 >0: boundary inside normalised text, bytes before `boundary`


def token_boundaries(
    text: str | TextIndex,
    offsets: np.ndarray,
    special: np.ndarray,
    nbytes: np.ndarray | None = None,
) -> Boundaries:
    """Where each position's prediction starts, in bytes of ``text``.

    Args:
        text: the block text the offsets index (or its ``text_index``, to share it).
        offsets: (n, 2) int character offsets ``[start, end)`` per token.
        special: (n,) bool, control tokens without text (BOS, EOS, padding). A leading run
            of them predicts the first text token, from the start of the text.
        nbytes: (n,) int, bytes of text each token stands for (``VocabSurface.text_nbytes``
            gathered at the ids). Needed to place boundaries inside a character; without
            it such positions get no boundary.

    Returns:
        ``Boundaries(boundary, reach, norm)``: (n,) int64 byte offset of the boundary
        after each position (-1 where the position has no usable prediction: last
        position, next token is special, non-leading special); (n,) bool whether the next
        token extends past the whitespace that follows the boundary; (n,) int64, non-zero
        only for boundaries inside text the tokenizer rewrote (then ``boundary`` is the
        end of that text and ``norm`` the tokenizer's bytes between the two).
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    special = np.asarray(special, dtype=bool)
    n = len(offsets)
    boundary = np.full(n, -1, np.int64)
    reach = np.zeros(n, bool)
    if n == 0:
        return Boundaries(boundary, reach, np.zeros(n, np.int64))
    tix = text if isinstance(text, TextIndex) else text_index(text)
    if offsets.max(initial=0) > tix.n_chars or offsets.min(initial=0) < 0:
        raise ValueError(
            f"offsets reach character {int(offsets.max())} but the text has {tix.n_chars}: "
            "the tokens were not produced from this text (join blocks by content hash)"
        )
    cb, nxt, nonws_cum = tix.cb, tix.next_text, tix.nonws_cum

    content = np.flatnonzero(~special)
    byte_end = np.full(n, -1, np.int64)
    norm = np.zeros(n, np.int64)
    if len(content):
        s, e = offsets[content, 0], offsets[content, 1]
        be = cb[e]
        # Runs of tokens whose offsets overlap share a character: only the run's last end
        # is a character boundary; inner ends come from the byte lengths of what follows.
        overlap = s[1:] < e[:-1]
        run_id = np.concatenate([[0], np.cumsum(~overlap)])
        last_of_run = np.flatnonzero(np.append(~overlap, True))
        run_end_byte = be[last_of_run][run_id]
        inner_norm = np.zeros(len(content), np.int64)
        if nbytes is not None:
            nb = np.asarray(nbytes, np.int64)[content]
            csum = np.cumsum(nb)
            after = csum[last_of_run][run_id] - csum  # bytes of the run after each token
            inner = run_end_byte - after
            run_start_byte = cb[s[np.concatenate([[0], last_of_run[:-1] + 1])]][run_id]
            # Byte counts that do not fit inside the run mean the tokenizer rewrote the
            # text (NFD splits a Hangul syllable into three jamo): such inner boundaries
            # exist only in the tokenizer's own normalised text. Key them by the run end
            # plus the normalised bytes that follow, in a separate key space, so they
            # pair with a tokenizer that normalises the same way, never with raw bytes.
            bad_run = np.zeros(len(last_of_run), bool)
            np.logical_or.at(bad_run, run_id, (inner < run_start_byte) | (inner > run_end_byte))
            bad = bad_run[run_id]
            inner_norm = np.where(bad, after, 0)
            inner = np.where(bad, run_end_byte, inner)
        else:
            inner = np.full(len(content), -1, np.int64)
        is_last = np.zeros(len(content), bool)
        is_last[last_of_run] = True
        byte_end[content] = np.where(is_last, be, inner)
        norm[content] = np.where(is_last, 0, inner_norm)

    # Boundary of position i = end of token i, if token i+1 is text.
    nxt_is_text = np.append(~special[1:], False)
    leading = np.cumprod(special).astype(bool)  # leading run of special tokens
    b = np.where(special, np.where(leading, 0, -1), byte_end)
    b = np.where(nxt_is_text, b, -1)
    # Text between token i's end and token i+1's start that is not whitespace was
    # swallowed by a normalizer (stripped accents, control characters): the model has
    # read it before predicting token i+1, so the boundary moves to its end.
    i_idx = np.flatnonzero(b >= 0)
    if len(i_idx):
        gap_from = np.where(special[i_idx], 0, offsets[i_idx, 1])
        gap_to = np.maximum(offsets[i_idx + 1, 0], gap_from)
        hidden = (nonws_cum[gap_to] - nonws_cum[gap_from]) > 0
        if hidden.any():
            b[i_idx[hidden]] = cb[tix.last_text[gap_to[hidden]] + 1]
    boundary[:] = b

    # Reach: does token i+1 extend beyond the whitespace run that starts at the boundary?
    i_idx = np.flatnonzero(boundary >= 0)
    if len(i_idx):
        bb = boundary[i_idx]
        c = np.searchsorted(cb, bb, side="right") - 1  # character holding byte bb
        inside = cb[c] != bb  # boundary inside a character: what follows is not space
        first_text_byte = np.where(inside, bb, cb[nxt[c]])
        next_end = byte_end[i_idx + 1]
        reach[i_idx] = (next_end > first_text_byte) | (norm[i_idx] > 0)
        # The next token's own end may be unknown (inner piece without nbytes): drop.
        boundary[i_idx[next_end < 0]] = -1
    norm = np.where(boundary >= 0, norm, 0)
    return Boundaries(boundary, reach, norm)


def _join(tgt: Boundaries, src: Boundaries) -> np.ndarray:
    """Match positions with equal (boundary, norm, reach, rank among equals from the end).

    Args:
        tgt: boundaries of the target positions, from ``token_boundaries``.
        src: the same for the source positions.

    Returns:
        (m,) int64 source position per target position, -1 where none matches.
    """
    width = max(len(tgt.boundary), len(src.boundary)) + 1
    nb = int(max(tgt.norm.max(initial=0), src.norm.max(initial=0))) + 1
    t_idx, tk = _ranked_keys(tgt, nb, width)
    s_idx, sk = _ranked_keys(src, nb, width)
    out = np.full(len(tgt.boundary), -1, np.int64)
    if len(t_idx) == 0 or len(s_idx) == 0:
        return out
    pos = np.minimum(np.searchsorted(sk, tk), len(sk) - 1)
    hit = sk[pos] == tk
    out[t_idx[hit]] = s_idx[pos[hit]]
    return out


def _ranked_keys(b: Boundaries, nb: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions with a boundary and their int keys (boundary, norm, reach, rank), sorted."""
    idx = np.flatnonzero(b.boundary >= 0)
    k = (b.boundary[idx] * nb + b.norm[idx]) * 2 + b.reach[idx]
    # Boundaries grow with the position, so the keys are (nearly) sorted already and a
    # stable sort (timsort) runs in about linear time.
    order = np.argsort(k, kind="stable")
    idx, ks = idx[order], k[order]
    # Positions of one side share a key only through zero-width tokens (a SentencePiece
    # prefix "▁" after BOS...). Rank them from the end so that the last ones pair first:
    # an identical tokenizer pairs them one to one, another tokenizer with a single such
    # position gets the last sub-token (the one whose next token carries the text).
    new_grp = np.concatenate([[True], ks[1:] != ks[:-1]]) if len(ks) else np.zeros(0, bool)
    grp_end = np.append(np.flatnonzero(new_grp)[1:], len(ks))[np.cumsum(new_grp) - 1]
    rank = grp_end - 1 - np.arange(len(ks))
    keys = ks * width + rank
    # Ranks count down inside a group: restore ascending order for searchsorted.
    order = np.argsort(keys, kind="stable")
    return idx[order], keys[order]


def align_offsets(
    src_offsets: np.ndarray,
    tgt_offsets: np.ndarray,
    src_special: np.ndarray,
    tgt_special: np.ndarray,
    *,
    text: str,
    src_nbytes: np.ndarray | None = None,
    tgt_nbytes: np.ndarray | None = None,
) -> np.ndarray:
    """Align target positions to source positions from offsets into the same text.

    Target position ``i`` (predicting target token ``i+1``) takes the source position
    ``j`` whose boundary (end of token ``j``) is the end of target token ``i`` and whose
    next token likewise stops inside / reaches past the whitespace there. When one source
    token spans several target tokens, only the last target sub-token shares the source
    token's end, so the teacher's prediction made *after* that source token lands there,
    never on the first sub-token.

    Args:
        src_offsets: (n, 2) int character offsets of the source tokens.
        tgt_offsets: (m, 2) int character offsets of the target tokens.
        src_special: (n,) bool, source control tokens without text.
        tgt_special: (m,) bool, target control tokens without text.
        text: the block text both tokenizations come from.
        src_nbytes: (n,) int bytes per source token (for boundaries inside characters).
        tgt_nbytes: (m,) int bytes per target token.

    Returns:
        (m,) int64: source position per target position, -1 where none matches (always
        for the last target position, which predicts nothing).
    """
    tix = text_index(text)
    tgt = token_boundaries(tix, tgt_offsets, tgt_special, tgt_nbytes)
    src = token_boundaries(tix, src_offsets, src_special, src_nbytes)
    return _join(tgt, src)


def special_positions(ids: np.ndarray, offsets: np.ndarray, surface: VocabSurface) -> np.ndarray:
    """(n,) bool: positions holding a control token with an empty span.

    A special token that covers text (WordPiece ``[UNK]`` for an unknown word, a literal
    ``<|endoftext|>`` typed in the text) has a real end boundary and counts as text.
    """
    ids = np.asarray(ids)
    offsets = np.asarray(offsets).reshape(-1, 2)
    return surface.special[ids] & (offsets[:, 1] <= offsets[:, 0])


def fallback_targets(
    tgt_ids: np.ndarray, matched: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets for positions without a teacher prediction: the NEXT gold token.

    SPEC 3 (research-code defect): the fallback one-hot must be the token the position
    predicts, ``tgt_ids[i + 1]``, never the current token ``tgt_ids[i]``.

    Args:
        tgt_ids: (m,) int target token ids of the block.
        matched: (m,) int source position per target position (-1 = none).

    Returns:
        ``(next_ids, use_fallback, has_target)``: (m,) int64 next gold token (-1 at the
        last position), (m,) bool positions that need the fallback (no match but a next
        token exists), (m,) bool positions with any target at all (all but the last). A
        caller that masks instead of using one-hots fuses only ``matched >= 0``.
    """
    tgt_ids = np.asarray(tgt_ids, np.int64)
    matched = np.asarray(matched)
    if tgt_ids.shape != matched.shape:
        raise ValueError(f"tgt_ids {tgt_ids.shape} and matched {matched.shape} differ")
    next_ids = np.full(tgt_ids.shape, -1, np.int64)
    next_ids[:-1] = tgt_ids[1:]
    has_target = np.zeros(tgt_ids.shape, bool)
    has_target[:-1] = True
    use_fallback = has_target & (matched < 0)
    return next_ids, use_fallback, has_target


def offsets_cover_text(
    text: str,
    offsets: np.ndarray,
    ids: np.ndarray,
    surface: VocabSurface,
    max_examples: int = 3,
) -> tuple[bool, list[tuple[int, str, str]]]:
    """Check that each token's surface form is what its offsets cut out of ``text``.

    Tokenizers that normalise (lower-casing, accent stripping, NFKC) still report offsets,
    but into text that reads differently from their tokens (SPEC 3b). Offsets alignment
    stays correct for the boundaries it keeps, yet the vocabulary mapping and any
    byte-level reasoning see other strings; the align stage reports this and can switch to
    ``mined_dp`` or refuse. Whitespace is ignored on both sides (WordPiece drops it,
    SentencePiece may add a prefix space); ``[UNK]`` tokens and control tokens are skipped.

    Args:
        text: the block text.
        offsets: (n, 2) int character offsets.
        ids: (n,) int token ids.
        surface: the tokenizer's ``VocabSurface``.
        max_examples: how many mismatches to return.

    Returns:
        ``(ok, examples)`` with examples ``(position, token text, text slice)``.
    """
    ids = np.asarray(ids)
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    keep = ~surface.special[ids] & ~surface.is_unknown(ids)
    idx = np.flatnonzero(keep)
    # Fast path (one C-level join): all token bytes, whitespace removed, equal the text
    # of the covered spans with whitespace removed.
    forms = surface.forms
    joined = b"".join(forms[i] for i in ids[idx])
    spans = "".join(text[s:e] for s, e in _merged_spans(offsets[idx]))
    if _strip_ws(to_text(joined)) == _strip_ws(spans):
        return True, []
    examples: list[tuple[int, str, str]] = []
    # Slow path, only to explain the failure: compare run by run of overlapping tokens.
    for a, z in _overlap_runs(offsets[idx]):
        tok_text = _strip_ws(to_text(b"".join(forms[i] for i in ids[idx[a:z]])))
        s, e = int(offsets[idx[a], 0]), int(offsets[idx[a:z], 1].max())
        if tok_text != _strip_ws(text[s:e]):
            examples.append((int(idx[a]), tok_text, text[s:e]))
            if len(examples) >= max_examples:
                break
    if not examples:  # runs agree one by one, so the tokens skip or repeat text
        examples.append((-1, _strip_ws(to_text(joined))[:40], _strip_ws(spans)[:40]))
    return False, examples


def _strip_ws(s: str) -> str:
    return "".join(s.split())


def _overlap_runs(offsets: np.ndarray) -> list[tuple[int, int]]:
    if len(offsets) == 0:
        return []
    overlap = offsets[1:, 0] < offsets[:-1, 1]
    starts = np.flatnonzero(np.concatenate([[True], ~overlap]))
    ends = np.append(starts[1:], len(offsets))
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _merged_spans(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Character spans of runs of overlapping tokens (each character counted once)."""
    return [(int(offsets[a, 0]), int(offsets[a:z, 1].max())) for a, z in _overlap_runs(offsets)]
