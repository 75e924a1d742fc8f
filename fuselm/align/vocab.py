r"""Vocabulary mapping between a source and a target tokenizer, and top-k remapping.

Methods (SPEC 3, "vocabulary mapping"; FuseLLM section 3.3):

- ``exact`` (EM): a source token maps to the target token with the same normalised
  surface form (``surface.py``: ``Ġthe`` == ``▁the`` == WordPiece ``the``; ``Ċ`` ==
  ``<0x0A>`` == ``"\n"``), word-start flag included.
- ``mined`` (MinED): exact first; otherwise the target token with the minimum Levenshtein
  distance between the normalised forms. Ties go to the **lowest target id**, so the map is
  deterministic and independent of thread scheduling.

Special tokens map only by role (eos, bos, unk, pad) to the target's token of the same
role, or stay unmapped: a chat marker has no textual neighbour worth borrowing mass from.

MinED over ~50k x ~32k strings is ~1.6e9 distances, too many to brute-force in a minute
on two cores. Exact minima are found in two passes: (1) a deletion-neighbourhood index
(every string with one character deleted, on both sides) yields *all* targets at distance
1 of a source string, because any single edit leaves a common one-deletion variant;
(2) only sources without any distance-1 target are compared against the whole target
vocabulary with rapidfuzz ``cdist`` (C++, all cores), in chunks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuselm.align.surface import SPECIAL_ROLES, VocabSurface, to_text, vocab_surface

KIND_UNMAPPED, KIND_EXACT, KIND_MINED = 0, 1, 2
KIND_NAMES = {KIND_UNMAPPED: "unmapped", KIND_EXACT: "exact", KIND_MINED: "mined"}
# Bump when the mapping algorithm changes, so cached maps keyed on the fingerprint
# are rebuilt instead of silently reused.
VOCAB_MAP_VERSION = "1"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass(frozen=True)
class VocabMap:
    """A source-id -> target-id table.

    Attributes:
        src_to_tgt: (V_src,) int32 target id per source id, -1 = unmapped. Its length is
            the source tokenizer's full id range, added tokens included.
        kind: (V_src,) uint8, ``KIND_UNMAPPED`` / ``KIND_EXACT`` / ``KIND_MINED``.
        method: the method name that built it.
        fingerprint: sha256 over both tokenizers' content, the method and the algorithm
            version: equal fingerprints mean an identical map (cache key).
        tgt_size: size of the target id range.
    """

    src_to_tgt: np.ndarray
    kind: np.ndarray
    method: str
    fingerprint: str
    tgt_size: int

    def __len__(self) -> int:
        """Size of the source id range."""
        return len(self.src_to_tgt)

    def counts(self) -> dict[str, int]:
        """Number of source ids per kind (``exact``, ``mined``, ``unmapped``)."""
        binc = np.bincount(self.kind, minlength=3)
        return {KIND_NAMES[k]: int(binc[k]) for k in KIND_NAMES}


@dataclass
class RemapStats:
    """Teacher top-k probability mass after remapping, summed so blocks can be added.

    Attributes:
        total: summed probability of all top-k entries.
        exact: mass whose source token maps exactly.
        mined: mass mapped by minimum edit distance.
        lost: mass of unmapped source tokens (dropped).
        merged: number of entries folded into another entry of the same row because both
            mapped to the same target id (their mass was summed, not dropped).
        rows: number of rows.
    """

    total: float = 0.0
    exact: float = 0.0
    mined: float = 0.0
    lost: float = 0.0
    merged: int = 0
    rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: RemapStats) -> RemapStats:
        """Sum two blocks' statistics."""
        return RemapStats(
            self.total + other.total,
            self.exact + other.exact,
            self.mined + other.mined,
            self.lost + other.lost,
            self.merged + other.merged,
            self.rows + other.rows,
        )

    def fractions(self) -> dict[str, float]:
        """Shares of the top-k mass: ``exact``, ``mined``, ``lost`` (sum to 1)."""
        t = self.total if self.total > 0 else 1.0
        return {"exact": self.exact / t, "mined": self.mined / t, "lost": self.lost / t}


VOCAB_METHOD_NAMES = ("exact", "mined")


def _check_method(method: str) -> None:
    if method not in VOCAB_METHOD_NAMES:
        raise ValueError(
            f"unknown vocabulary mapping method {method!r}; valid: {', '.join(VOCAB_METHOD_NAMES)}"
        )


def vocab_map_fingerprint(src: VocabSurface, tgt: VocabSurface, method: str) -> str:
    """Cache key of a vocabulary map: both tokenizers' content, method, algorithm version."""
    h = hashlib.sha256()
    for part in (src.fingerprint, tgt.fingerprint, method, VOCAB_MAP_VERSION):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def _as_surface(tok: Any) -> VocabSurface:
    return tok if isinstance(tok, VocabSurface) else vocab_surface(tok)


def build_vocab_map(
    src_tok: Any, tgt_tok: Any, method: str = "mined", *, workers: int = -1
) -> VocabMap:
    """Map every source id onto a target id.

    Args:
        src_tok: source tokenizer (transformers fast tokenizer, ``tokenizers.Tokenizer``
            or a precomputed ``VocabSurface``).
        tgt_tok: target tokenizer (same kinds).
        method: ``exact`` or ``mined`` (see the module docstring).
        workers: threads for rapidfuzz (-1 = all cores).

    Returns:
        The ``VocabMap``.

    Raises:
        ValueError: unknown method (the message lists the valid ones).
    """
    _check_method(method)
    src, tgt = _as_surface(src_tok), _as_surface(tgt_tok)
    v_src = len(src)
    src_to_tgt = np.full(v_src, -1, np.int32)
    kind = np.zeros(v_src, np.uint8)

    # Target lookup: form -> one id. Several ids can share a form (SentencePiece has both
    # the byte-fallback <0x41> and the piece "A"): prefer the piece the tokenizer really
    # emits for that text (not a byte fallback), then the lowest id. A source piece whose
    # exact spelling exists in the target with the same form keeps that id, so identical
    # tokenizers map to the identity.
    tgt_index: dict[bytes, int] = {}
    fallback_form = np.array([_is_byte_fallback(p, tgt) for p in tgt.pieces], bool)
    for i, f in enumerate(tgt.forms):
        if not f or tgt.special[i]:
            continue
        j = tgt_index.get(f)
        if j is None or (fallback_form[j] and not fallback_form[i]):
            tgt_index[f] = i
    tgt_piece = {p: i for i, p in enumerate(tgt.pieces) if p and not tgt.special[i]}
    for i, f in enumerate(src.forms):
        if f and not src.special[i]:
            same = tgt_piece.get(src.pieces[i])
            hit = same if same is not None and tgt.forms[same] == f else tgt_index.get(f)
            if hit is not None:
                src_to_tgt[i] = hit
                kind[i] = KIND_EXACT

    # Special tokens: by role only.
    tgt_by_role: dict[str, int] = {}
    for tid, roles in sorted(tgt.roles.items()):
        for r in roles:
            tgt_by_role.setdefault(r, tid)
    for sid, roles in src.roles.items():
        for r in SPECIAL_ROLES:
            if r in roles and r in tgt_by_role:
                src_to_tgt[sid] = tgt_by_role[r]
                kind[sid] = KIND_EXACT
                break

    if method == "mined":
        todo = np.flatnonzero((kind == KIND_UNMAPPED) & ~src.special)
        todo = np.array([i for i in todo if src.forms[i]], np.int64)
        choices_ids = np.fromiter(tgt_index.values(), np.int64)  # one id per form
        choices_ids.sort()
        if len(todo) and len(choices_ids):
            choices = [to_text(tgt.forms[i]) for i in choices_ids]
            queries = [to_text(src.forms[i]) for i in todo]
            best = _min_edit_distance(queries, choices, workers)
            src_to_tgt[todo] = choices_ids[best].astype(np.int32)
            kind[todo] = KIND_MINED

    return VocabMap(
        src_to_tgt=src_to_tgt,
        kind=kind,
        method=method,
        fingerprint=vocab_map_fingerprint(src, tgt, method),
        tgt_size=len(tgt),
    )


def _is_byte_fallback(piece: str, surface: VocabSurface) -> bool:
    return surface.info.byte_fallback and _BYTE_PIECE.match(piece) is not None


def _deletion_variants(s: str) -> set[str]:
    """``s`` and every string obtained by deleting one character of ``s``."""
    return {s} | {s[:k] + s[k + 1 :] for k in range(len(s))}


def _min_edit_distance(queries: list[str], choices: list[str], workers: int) -> np.ndarray:
    """Index into ``choices`` of the nearest string per query (ties: lowest index).

    Args:
        queries: strings without an exact match in ``choices``.
        choices: candidate strings, ordered by target id.
        workers: rapidfuzz threads.

    Returns:
        (len(queries),) int64 index into ``choices``.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    # Pass 1: distance 1 via shared one-deletion variants. No query equals a choice
    # (those were exact matches), so distance 1 is the best possible.
    variants: dict[str, list[int]] = {}
    for ci, c in enumerate(choices):
        for v in _deletion_variants(c):
            variants.setdefault(v, []).append(ci)
    pair_q: list[int] = []
    pair_c: list[int] = []
    for qi, q in enumerate(queries):
        cands: set[int] = set()
        for v in _deletion_variants(q):
            hit = variants.get(v)
            if hit:
                cands.update(hit)
        pair_q.extend([qi] * len(cands))
        pair_c.extend(cands)
    best = np.full(len(queries), -1, np.int64)
    if pair_q:
        pq = np.asarray(pair_q, np.int64)
        pc = np.asarray(pair_c, np.int64)
        d = process.cpdist(
            [queries[i] for i in pq],
            [choices[i] for i in pc],
            scorer=Levenshtein.distance,
            workers=workers,
            dtype=np.int32,
        )
        # Shared variants also catch some distance-2 pairs (transpositions): keep 1s.
        one = d == 1
        pq, pc = pq[one], pc[one]
        order = np.lexsort((pc, pq))  # by query, then by choice index (= target id)
        pq, pc = pq[order], pc[order]
        first = np.concatenate([[True], pq[1:] != pq[:-1]]) if len(pq) else pq.astype(bool)
        best[pq[first]] = pc[first]

    # Pass 2: brute force for the rest, chunked to bound memory (chunk x |choices| int32).
    rest = np.flatnonzero(best < 0)
    chunk = max(1, min(len(rest), 2**27 // max(1, len(choices))))
    for a in range(0, len(rest), chunk):
        sel = rest[a : a + chunk]
        d = process.cdist(
            [queries[i] for i in sel],
            choices,
            scorer=Levenshtein.distance,
            workers=workers,
            dtype=np.int32,
        )
        best[sel] = np.argmin(d, axis=1)  # argmin returns the first (lowest id) minimum
    return best


def remap_topk(
    ids: np.ndarray, logprobs: np.ndarray, vmap: VocabMap
) -> tuple[np.ndarray, np.ndarray, RemapStats]:
    """Map a teacher's top-k entries into the target vocabulary.

    Entries of one row that land on the same target id are combined by log-sum-exp (their
    probability mass is summed, SPEC 3); unmapped entries are dropped and their mass is
    counted as lost. Each group keeps the slot of its first entry (a top-k sorted by
    probability stays sorted unless a merge lifts an entry), the remaining entries move
    up, and the freed slots at the end are padded with id -1 / log-probability -inf.

    Args:
        ids: (N, K) int source token ids. Negative ids are empty slots and are ignored.
        logprobs: (N, K) float log-probabilities of those ids (true log-softmax values).
        vmap: the vocabulary map.

    Returns:
        ``(tgt_ids, tgt_logprobs, stats)``: (N, K) int64, (N, K) float32, ``RemapStats``.

    Raises:
        ValueError: shapes differ, or a source id is outside the map (wrong tokenizer).
    """
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs, np.float64)
    if ids.shape != logprobs.shape or ids.ndim != 2:
        raise ValueError(f"ids {ids.shape} and logprobs {logprobs.shape} must be equal (N, K)")
    n, k = ids.shape
    if ids.size and ids.max() >= len(vmap):
        bad = int(ids.max())
        raise ValueError(
            f"source id {bad} is outside the vocabulary map ({len(vmap)} ids): the capture "
            "was made with another tokenizer than the one the map was built for"
        )
    present = ids >= 0
    safe = np.where(present, ids, 0)
    tgt = np.where(present, vmap.src_to_tgt[safe], -1).astype(np.int64)  # (N, K)
    kind = np.where(present, vmap.kind[safe], KIND_UNMAPPED)  # (N, K)
    prob = np.where(present, np.exp(logprobs), 0.0)  # (N, K)
    by_kind = np.bincount(kind.ravel(), weights=prob.ravel(), minlength=3)
    stats = RemapStats(
        total=float(by_kind.sum()),
        exact=float(by_kind[KIND_EXACT]),
        mined=float(by_kind[KIND_MINED]),
        lost=float(by_kind[KIND_UNMAPPED]),  # absent slots carry probability 0
        rows=n,
    )
    out_ids = tgt.copy()
    out_lp = logprobs.astype(np.float32)
    if n == 0 or k == 0:
        return out_ids, out_lp, stats
    # Most rows need nothing: every entry maps, to distinct ids. Find the others with a
    # row-wise sort (K is small) and rebuild only those.
    srt = np.sort(tgt, axis=1)
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1)
    rows = np.flatnonzero(dup | (srt[:, 0] < 0))
    if len(rows):
        ids_r, lp_r, merged = _combine_rows(tgt[rows], logprobs[rows])
        out_ids[rows] = ids_r
        out_lp[rows] = lp_r
        stats.merged = merged
    return out_ids, out_lp, stats


def _combine_rows(tgt: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Merge equal target ids of each row by log-sum-exp, drop -1 ids, compact left.

    Args:
        tgt: (R, K) int64 target ids, -1 = dropped.
        logprobs: (R, K) float log-probabilities.

    Returns:
        (R, K) int64 ids, (R, K) float32 log-probabilities, number of merged entries.
    """
    r_n, k = tgt.shape
    valid = tgt >= 0
    same = (tgt[:, :, None] == tgt[:, None, :]) & valid[:, None, :]  # (R, K, K)
    leader = valid & (np.argmax(same, axis=2) == np.arange(k))  # first entry of a group
    lse = np.where(valid, logprobs, -np.inf)
    dup = np.flatnonzero((valid & ~leader).any(axis=1))
    if len(dup):
        grp = np.where(same[dup], lse[dup][:, None, :], -np.inf)  # (D, K, K): a's group
        gmax = grp.max(axis=2)
        safe = np.where(np.isfinite(gmax), gmax, 0.0)  # shift by the group max: exact
        with np.errstate(divide="ignore", invalid="ignore"):
            lse[dup] = safe + np.log(np.exp(grp - safe[:, :, None]).sum(axis=2))
    # Groups keep the slot order of their first entry; freed slots go to the end.
    slot = np.cumsum(leader, axis=1) - 1
    r, c = np.nonzero(leader)
    out_ids = np.full((r_n, k), -1, np.int64)
    out_lp = np.full((r_n, k), -np.inf, np.float32)
    out_ids[r, slot[r, c]] = tgt[r, c]
    out_lp[r, slot[r, c]] = lse[r, c]
    return out_ids, out_lp, int(valid.sum() - leader.sum())


def top_unmapped(
    vmap: VocabMap,
    surface: VocabSurface,
    ids: np.ndarray | None = None,
    logprobs: np.ndarray | None = None,
    n: int = 20,
) -> list[tuple[str, int, float]]:
    """The most frequent unmapped source tokens (a diagnostic, SPEC 3 / issue 4).

    Args:
        vmap: the vocabulary map.
        surface: the source ``VocabSurface`` (for readable pieces).
        ids: optional (N, K) or flat source ids seen in captures; without them the
            unmapped vocabulary entries are listed with count 0.
        logprobs: optional log-probabilities matching ``ids``: adds the lost mass.
        n: how many to return.

    Returns:
        ``[(piece, count, lost_mass), ...]`` sorted by count (then mass), descending.
    """
    unmapped = vmap.src_to_tgt < 0
    if ids is None:
        idx = np.flatnonzero(unmapped)[:n]
        return [(surface.pieces[i], 0, 0.0) for i in idx]
    flat = np.asarray(ids).ravel()
    ok = (flat >= 0) & (flat < len(vmap))
    lost_ids = flat[ok][unmapped[flat[ok]]]
    if len(lost_ids) == 0:
        return []
    counts = np.bincount(lost_ids, minlength=len(vmap))
    mass = np.zeros(len(vmap))
    if logprobs is not None:
        lp = np.asarray(logprobs, np.float64).ravel()[ok][unmapped[flat[ok]]]
        np.add.at(mass, lost_ids, np.exp(lp))
    cand = np.flatnonzero(counts)
    order = np.lexsort((-mass[cand], -counts[cand]))[:n]
    return [(surface.pieces[i], int(counts[i]), float(mass[i])) for i in cand[order]]
