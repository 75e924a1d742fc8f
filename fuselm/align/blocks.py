"""Aligning one block: pure array code between a source capture and the target's tokens.

Split from ``stage.py`` so that the per-block computation (what lands where, how many
bytes each prediction covers, the diagnostics) reads on its own; the stage module keeps
the orchestration (shards, hashes, caches, manifests). No file I/O here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from fuselm.align.diagnostics import AlignStats, alignment_stats
from fuselm.align.methods import Tokenized
from fuselm.align.offsets import (
    special_positions,
    text_index,
    token_boundaries,
)
from fuselm.align.records import AlignedBlock
from fuselm.align.surface import VocabSurface
from fuselm.align.vocab import (
    KIND_EXACT,
    RemapStats,
    VocabMap,
    remap_topk,
)
from fuselm.capture.storage import CaptureBlock

log = logging.getLogger("fuselm.align")

IDENTITY = "identity"


# --------------------------------------------------------------------------- per block


class Tokens(NamedTuple):
    """One tokenization of a block: ids, character offsets, and whether it round-trips.

    Attributes:
        token_ids: (T,) int token ids (special tokens included).
        offsets: (T, 2) int character ``[start, end)`` into the block text.
        text_roundtrip: decoding the ids gives back the text exactly.
    """

    token_ids: np.ndarray
    offsets: np.ndarray
    text_roundtrip: bool


@dataclass
class BlockDiag:
    """What one block contributes to a source's diagnostics."""

    align: AlignStats
    remap: RemapStats
    unmapped_ids: np.ndarray  # (U,) source ids seen in used top-k rows that had no target
    unmapped_mass: np.ndarray  # (U,) their probabilities
    rows_without_mass: int = 0  # valid positions whose whole top-k was unmapped


def token_byte_ends(
    text: Any, offsets: np.ndarray, special: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """Byte offset in the UTF-8 text where each token's prediction target ends.

    Built from the same boundaries the offsets alignment uses (``token_boundaries``:
    ends, not starts; pieces of a split character placed by their byte lengths; text a
    normalizer swallowed moved into the boundary), then made monotone. Control tokens
    end where the text before them ends; a leading run of them ends at byte 0. The last
    text token is extended to the end of the block, so trailing whitespace a tokenizer
    drops (WordPiece) is counted with the last prediction instead of vanishing.

    Args:
        text: the block text, or its ``offsets.text_index``.
        offsets: (n, 2) int character offsets.
        special: (n,) bool control tokens without text (``special_positions``).
        nbytes: (n,) int bytes of text per token (``VocabSurface.text_nbytes`` at the ids).

    Returns:
        (n,) int64, non-decreasing. Position ``j`` predicts the bytes
        ``ends[j] .. ends[j + 1]``; they partition ``ends[0] .. len(text bytes)``.
    """
    tix = text if not isinstance(text, str) else text_index(text)
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    special = np.asarray(special, bool)
    n = len(offsets)
    if n == 0:
        return np.zeros(0, np.int64)
    b = token_boundaries(tix, offsets, special, nbytes).boundary  # end of j if j+1 is text
    own = np.where(special, -1, tix.cb[offsets[:, 1]])
    ends = np.where(b >= 0, b, own)
    ends = np.maximum.accumulate(np.maximum(ends, 0))
    text_pos = np.flatnonzero(~special)
    if len(text_pos):
        ends[text_pos[-1] :] = tix.cb[-1]
    return ends


def align_block(
    text: str,
    src: CaptureBlock,
    tgt: Tokens,
    *,
    src_surface: VocabSurface,
    tgt_surface: VocabSurface,
    vmap: VocabMap,
    method: Callable | None,
    hash: str,
    block_id: str,
    domain: str,
    split: str,
) -> tuple[AlignedBlock, BlockDiag]:
    """Align one source's capture of a block onto the target's tokenization of it.

    Args:
        text: the block text both tokenizations come from.
        src: the source's ``CaptureBlock`` (token ids, offsets, ``(P_s, K)`` top-k, gold).
        tgt: the target's tokens of the same text.
        src_surface: the source tokenizer's surface forms.
        tgt_surface: the target tokenizer's surface forms.
        vmap: source-id -> target-id map.
        method: an ``ALIGN_METHODS`` function ``(text, src, tgt) -> (T,) source
            position per target position``; None = identity (the target as a source).
        hash: the block's content hash.
        block_id: the block's id (for the record).
        domain: the block's domain label.
        split: ``train`` or ``validation``.

    Returns:
        ``(record, diagnostics)``. Target position ``t`` (predicting target token
        ``t + 1``) is valid where the alignment gives it a source position ``j``; it then
        carries the remapped top-k of ``j``, the source's gold log-probability at ``j`` and
        the bytes of the source's next token (``token_byte_ends`` differences).
    """
    t_n = len(tgt.token_ids)
    p = max(t_n - 1, 0)
    s_n = len(src.token_ids)
    s_p = src.n_positions
    tix = text_index(text)
    s_ids = np.asarray(src.token_ids, np.int64)
    t_ids = np.asarray(tgt.token_ids, np.int64)
    s_off = np.asarray(src.offsets, np.int64).reshape(-1, 2)
    t_off = np.asarray(tgt.offsets, np.int64).reshape(-1, 2)
    s_special = special_positions(s_ids, s_off, src_surface)
    t_special = special_positions(t_ids, t_off, tgt_surface)

    if method is None:  # identity: the target's own capture
        if s_n != t_n or not np.array_equal(s_ids, t_ids):
            raise ValueError("the target's capture and its tokens of the block differ")
        matched = np.arange(t_n, dtype=np.int64)
        if t_n:
            matched[-1] = -1
    else:
        matched = np.asarray(
            method(
                text,
                Tokenized(s_ids, s_off, src_surface),
                Tokenized(t_ids, t_off, tgt_surface),
            ),
            np.int64,
        )
    if matched.shape != (t_n,):
        raise ValueError(f"alignment returned {matched.shape}, expected ({t_n},)")
    pos = matched[:p]
    valid = (pos >= 0) & (pos < s_p)  # a source position with a stored prediction
    rows = pos[valid]

    k = src.ids.shape[1] if src.ids.ndim == 2 else 0
    src_top = src.ids[rows].astype(np.int64)  # (V, K)
    src_lp = src.logprobs[rows]  # (V, K)
    r_ids, r_lp, rstats = remap_topk(src_top, src_lp, vmap)
    ids = np.full((p, k), -1, np.int32)
    lps = np.full((p, k), -np.inf, np.float32)
    ids[valid] = r_ids
    lps[valid] = r_lp

    # Per source position: bytes of its gold next token, from the shared boundaries.
    s_nb = src_surface.text_nbytes()[s_ids] if s_n else np.zeros(0, np.int64)
    ends = token_byte_ends(tix, s_off, s_special, s_nb)
    src_next = np.diff(ends)[:s_p] if s_n else np.zeros(0, np.int64)  # (P_s,)
    gold = np.zeros(p, np.float32)
    next_bytes = np.zeros(p, np.int32)
    gold[valid] = src.gold[rows]
    next_bytes[valid] = src_next[rows]
    # Whole-block cross-entropy over every source position that predicts text (a
    # position predicting a control token -- EOS, SEP -- predicts no bytes), except the
    # block's first text token: only a source with a BOS predicts it, without context,
    # and counting it for some sources and not others would bias MinCE against them.
    predicts_text = ~s_special[1 : s_p + 1]
    text_at = np.flatnonzero(~s_special)
    if len(text_at) and 1 <= text_at[0] <= s_p:
        predicts_text[text_at[0] - 1] = False
    nll_sum = float(-np.asarray(src.gold, np.float64)[:s_p][predicts_text].sum())
    nll_bytes = int(src_next[predicts_text].sum())

    # Diagnostics. "Closing" the sequence: when both last tokens are text ending at the
    # same character, the last predicted target token coincides with the source's, so
    # the last predictive position can count as one-to-one.
    closed = matched.copy()
    if t_n and s_n and not t_special[-1] and not s_special[-1] and t_off[-1, 1] == s_off[-1, 1]:
        closed[-1] = s_n - 1
    astats = alignment_stats(closed, t_special)
    nxt = np.append(closed[1:], -1)
    one_to_one = ((closed >= 0) & (nxt >= 0) & (nxt == closed + 1))[:p] & valid
    present = src_top >= 0
    lost = present & (vmap.src_to_tgt[np.where(present, src_top, 0)] < 0)
    # The teacher's mass outside its aligned ids: what capture left outside the top-k,
    # plus the top-k entries the vocabulary map could not place (never silently dropped).
    lost_mass = np.where(lost, np.exp(np.asarray(src_lp, np.float64)), 0.0).sum(axis=1)  # (V,)
    src_tail = np.exp(np.asarray(src.tail_logmass, np.float64)[rows])  # (V,)
    tail_logmass = np.full(p, -np.inf, np.float32)
    with np.errstate(divide="ignore"):
        tail_logmass[valid] = np.log(np.minimum(src_tail + lost_mass, 1.0))
    without_mass = int((~(r_ids >= 0).any(axis=1)).sum()) if len(r_ids) else 0
    diag = BlockDiag(
        align=astats,
        remap=rstats,
        unmapped_ids=src_top[lost],
        unmapped_mass=np.exp(np.asarray(src_lp, np.float64)[lost]),
        rows_without_mass=without_mass,
    )
    record = AlignedBlock(
        hash=hash,
        block_id=block_id,
        domain=domain,
        split=split,
        input_ids=t_ids.astype(np.int32),
        ids=ids,
        logprobs=lps,
        valid=valid,
        gold=gold,
        next_bytes=next_bytes,
        nll_sum=nll_sum,
        nll_bytes=nll_bytes,
        tail_logmass=tail_logmass,
        one_to_one=one_to_one,
    )
    return record, diag


# --------------------------------------------------------------------------- tokenizers


def encode_target(tokenizer: Any, texts: list[str], bos: str) -> list[Tokens]:
    """Tokenize blocks for the target exactly as the capture stage does (BOS policy).

    Used when the target is not captured (``target.as_source: false``); mirrors
    ``capture.stage.Capturer.encode`` and its round-trip check.

    Args:
        tokenizer: the target's fast tokenizer.
        texts: block texts.
        bos: the target's BOS policy (``auto``, ``add``, ``none``).

    Returns:
        One ``Tokens`` per text.
    """
    if not texts:
        return []
    enc = tokenizer(
        list(texts),
        add_special_tokens=bos == "auto",
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    out = []
    for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids = np.asarray(ids, np.int64)
        offs = np.asarray(offs, np.int64).reshape(-1, 2)
        if bos == "add":
            ids = np.concatenate([[tokenizer.bos_token_id], ids])
            offs = np.concatenate([np.zeros((1, 2), np.int64), offs])
        back = tokenizer.decode(
            ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        out.append(Tokens(ids, offs, back == text))
    return out


def identity_map(surface: VocabSurface) -> VocabMap:
    """The vocabulary map of a tokenizer onto itself (every id to itself, exact)."""
    n = len(surface)
    return VocabMap(
        src_to_tgt=np.arange(n, dtype=np.int32),
        kind=np.full(n, KIND_EXACT, np.uint8),
        method=IDENTITY,
        fingerprint=f"{IDENTITY}:{surface.fingerprint}",
        tgt_size=n,
    )
