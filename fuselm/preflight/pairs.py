"""Source -> target pair diagnostics on the corpus sample, and the verdict per pair.

Everything here reuses the align library (``fuselm.align``): the same tokenization with
offsets, the same ``offsets`` alignment, the same EM vocabulary map and the same remapping
that the align stage will run, so the preflight numbers are the align stage's numbers on
a sample, not a second implementation of them.

MinED without its cost. ``build_vocab_map(..., "mined")`` gives every non-special source
token without an exact match *some* target token, so which source ids end up exact / MinED
/ unmapped (and hence every mass share reported here) follows from the exact map alone
(``mined_kinds``; tested against the real map). The full MinED search costs 2 s for two
50k vocabularies but 20-60 s for two 130-150k ones on 2 CPU cores, so it only runs with
``--mined-map``; without it the nearest target token is looked up only for the few
frequent source tokens shown as examples.

Verdict thresholds (``THRESHOLDS``; a pair gets the worst grade of its checks):

- ``coverage``: share of the target's predictive positions that get a teacher prediction
  under offsets alignment. good >= 0.90 (same pre-tokenization, e.g. Qwen2 <- Llama-3),
  usable >= 0.50 (SPEC 3b: GPT-2 vs Llama-3-style on code shares about half).
- ``exact_mass``: share of the teacher's probability mass on tokens with an exact
  target counterpart. good >= 0.90, usable >= 0.60.
- ``lost_mass``: mass that the configured ``align.vocab`` mapping drops. good <= 0.02,
  usable <= 0.20.
- a tokenizer that rewrites text (lower-casing, accent stripping, NFKC: read from its
  normalizer) caps the pair at ``usable``: its tokens are not the raw text, so mapped
  tokens differ in case or accents even when they "match".
- more than 1% of a side's sample tokens being its unknown token caps the pair at
  ``usable`` (that text is invisible to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuselm.align import (
    KIND_EXACT,
    KIND_MINED,
    KIND_UNMAPPED,
    AlignStats,
    Tokenized,
    VocabMap,
    alignment_stats,
    build_vocab_map,
    offsets_cover_text,
    offsets_method,
    remap_topk,
    tokenize,
)
from fuselm.align.surface import VocabSurface, to_text

GRADES = ("good", "usable", "poor")

THRESHOLDS: dict[str, dict[str, float]] = {
    "coverage": {"good": 0.90, "usable": 0.50},  # at least
    "exact_mass": {"good": 0.90, "usable": 0.60},  # at least
    "lost_mass": {"good": 0.02, "usable": 0.20},  # at most
}
UNK_SHARE_LIMIT = 0.01

MASS_ESTIMATE_BASIS = (
    "estimate: the source's gold next tokens on the sample, frequency-weighted (as if the "
    "teacher's top-k mass sat on the tokens that really follow)"
)


def worst(grades: list[str]) -> str:
    """The worst of several grades (``good`` < ``usable`` < ``poor``); good if none."""
    return max(grades, key=GRADES.index, default="good")


# --------------------------------------------------------------------------- sample side


@dataclass
class SampleTokens:
    """One tokenizer's tokenization of the sample and what it says about the tokenizer.

    Attributes:
        blocks: one ``Tokenized`` per sample document (special tokens as the capture adds
            them under the model's BOS policy).
        roundtrip: per document, whether decode(encode(text)) gives the text back.
        covered: per document, ``offsets_cover_text``.
        example: a first (token text, raw text) mismatch of ``offsets_cover_text``.
    """

    blocks: list[Tokenized]
    roundtrip: list[bool]
    covered: list[bool]
    example: list[str] | None = None
    _gold: np.ndarray | None = field(default=None, repr=False)

    def text_tokens(self) -> int:
        """Tokens holding text (control tokens not counted)."""
        return int(sum((~b.special()).sum() for b in self.blocks))

    def gold_counts(self) -> np.ndarray:
        """(V,) how often each id is the gold next token of a position (specials excluded)."""
        if self._gold is None:
            size = len(self.blocks[0].surface) if self.blocks else 0
            counts = np.zeros(size, np.int64)
            for b in self.blocks:
                nxt = b.ids[1:][~b.special()[1:]]
                counts += np.bincount(nxt, minlength=size)
            self._gold = counts
        return self._gold

    def summary(self, texts: list[str]) -> dict[str, Any]:
        """JSON-ready sample statistics of this tokenizer."""
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tok = self.text_tokens()
        unk = 0
        for b in self.blocks:
            unk += int(b.surface.is_unknown(b.ids).sum())
        n = max(1, len(self.blocks))
        return {
            "tokens": n_tok,
            "bytes_per_token": round(n_bytes / max(1, n_tok), 3),
            "chars_per_token": round(sum(len(t) for t in texts) / max(1, n_tok), 3),
            "unk_share": unk / max(1, n_tok),
            "roundtrip_share": sum(self.roundtrip) / n,
            "offsets_cover_share": sum(self.covered) / n,
            "offsets_cover_example": self.example,
        }


def tokenize_sample(tok: Any, texts: list[str], bos_policy: str = "auto") -> SampleTokens:
    """Tokenize every sample document as the capture stage would (BOS policy included).

    Args:
        tok: a fast tokenizer.
        texts: the sample documents.
        bos_policy: the model's ``bos`` setting: ``auto`` (the tokenizer's own special
            tokens), ``add`` (BOS only) or ``none``.
    """
    blocks, rt, cov = [], [], []
    example = None
    bos = tok.bos_token_id
    for text in texts:
        t = tokenize(tok, text, add_special_tokens=bos_policy == "auto")
        if bos_policy == "add" and bos is not None:
            t = Tokenized(
                ids=np.concatenate([[bos], t.ids]),
                offsets=np.concatenate([np.zeros((1, 2), np.int64), t.offsets]),
                surface=t.surface,
            )
        blocks.append(t)
        out = tok.decode(
            t.ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        rt.append(out == text)
        ok, ex = offsets_cover_text(text, t.offsets, t.ids, t.surface)
        cov.append(bool(ok))
        if not ok and example is None and ex:
            example = [ex[0][1][:40], ex[0][2][:40]]
    return SampleTokens(blocks, rt, cov, example)


# --------------------------------------------------------------------------- vocabulary


def mined_kinds(exact: VocabMap, src: VocabSurface) -> np.ndarray:
    """Per source id, its kind under MinED, from the exact map alone.

    ``build_vocab_map(method="mined")`` first builds the exact map, then gives every source
    id that is unmapped, not special and has a surface form its nearest target token. So
    the kinds (not the chosen targets) are known without the edit-distance search.

    Returns:
        (V_src,) uint8 ``KIND_*``.
    """
    kind = exact.kind.copy()
    has_form = np.fromiter((len(f) > 0 for f in src.forms), bool, len(src))
    kind[(kind == KIND_UNMAPPED) & ~src.special & has_form] = KIND_MINED
    return kind


def kinds_map(exact: VocabMap, kind: np.ndarray) -> VocabMap:
    """A ``VocabMap`` with the exact map's targets and other kinds, for ``remap_topk`` stats.

    ``remap_topk`` sums mass by ``kind``; the targets only decide merges. Entries of kind
    MinED keep target -1 here, so the returned remapped ids are not meaningful: use it for
    the mass statistics only.
    """
    return VocabMap(exact.src_to_tgt, kind, "mined-kinds", exact.fingerprint, exact.tgt_size)


def vocab_overlap(exact: VocabMap, src: VocabSurface, tgt: VocabSurface) -> dict[str, Any]:
    """Overlap of the two vocabularies after surface normalisation.

    Returns:
        ``source_ids`` (text tokens of the source), ``exact_share`` (of those, with an
        exact normalised counterpart), ``mined_share`` (mapped at all under MinED),
        ``target_covered_share`` (target text tokens hit by some exact source token).
    """
    text_src = ~src.special
    n = int(text_src.sum())
    exact_mask = (exact.kind == KIND_EXACT) & text_src
    mined = mined_kinds(exact, src)
    hit = np.unique(exact.src_to_tgt[exact_mask])
    text_tgt = ~tgt.special
    covered = int(text_tgt[hit[(hit >= 0) & (hit < len(tgt))]].sum())
    return {
        "source_ids": n,
        "target_ids": int(text_tgt.sum()),
        "exact_share": int(exact_mask.sum()) / max(1, n),
        "mined_share": int(((mined != KIND_UNMAPPED) & text_src).sum()) / max(1, n),
        "target_covered_share": covered / max(1, int(text_tgt.sum())),
    }


_CHOICES: dict[str, tuple[list[str], np.ndarray]] = {}


def _target_choices(tgt: VocabSurface) -> tuple[list[str], np.ndarray]:
    """Target forms as strings, one id per form (lowest id), for nearest-token lookups."""
    if tgt.fingerprint not in _CHOICES:
        seen: dict[bytes, int] = {}
        for i, f in enumerate(tgt.forms):
            if f and not tgt.special[i] and f not in seen:
                seen[f] = i
        ids = np.fromiter(seen.values(), np.int64, len(seen))
        _CHOICES[tgt.fingerprint] = ([to_text(f) for f in seen], ids)
    return _CHOICES[tgt.fingerprint]


def nearest_targets(
    queries: list[int], src: VocabSurface, tgt: VocabSurface
) -> list[tuple[int, int]]:
    """MinED target (id, edit distance) for a few source ids (rapidfuzz, one query each)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    choices, ids = _target_choices(tgt)
    out = []
    for q in queries:
        if not choices or not src.forms[q]:
            out.append((-1, -1))
            continue
        _, dist, idx = process.extractOne(
            to_text(src.forms[q]), choices, scorer=Levenshtein.distance
        )
        out.append((int(ids[idx]), int(dist)))
    return out


def _show(surface: VocabSurface, i: int) -> str:
    return to_text(surface.forms[i]) if i >= 0 else ""


def unmapped_examples(
    gold: np.ndarray,
    exact: VocabMap,
    src: VocabSurface,
    tgt: VocabSurface,
    mined: VocabMap | None = None,
    n: int = 6,
) -> list[dict[str, Any]]:
    """The sample's most frequent source tokens without an exact target counterpart.

    Args:
        gold: (V_src,) gold-token counts on the sample.
        exact: the exact vocabulary map.
        src: source surface.
        tgt: target surface.
        mined: the full MinED map when it was built (else looked up per token).
        n: how many.

    Returns:
        ``[{"token", "share", "nearest", "distance"}]``: the source token's text, its share
        of the sample's gold tokens, its MinED target's text and their edit distance.
    """
    total = max(1, int(gold.sum()))
    cand = np.flatnonzero((exact.kind != KIND_EXACT) & ~src.special & (gold > 0))
    top = cand[np.argsort(-gold[cand], kind="stable")][:n].tolist()
    if mined is not None:
        from rapidfuzz.distance import Levenshtein

        pairs = []
        for q in top:
            t = int(mined.src_to_tgt[q])
            d = Levenshtein.distance(_show(src, q), _show(tgt, t)) if t >= 0 else -1
            pairs.append((t, d))
    else:
        pairs = nearest_targets(top, src, tgt)
    return [
        {
            "token": _show(src, q),
            "share": int(gold[q]) / total,
            "nearest": _show(tgt, t),
            "distance": d,
        }
        for q, (t, d) in zip(top, pairs, strict=True)
    ]


# --------------------------------------------------------------------------- mass


def mass_from_counts(gold: np.ndarray, kind: np.ndarray, vocab_method: str) -> dict[str, Any]:
    """Expected top-k mass shares from gold-token frequencies (the estimate).

    Args:
        gold: (V_src,) gold-token counts.
        kind: (V_src,) kinds under MinED (``mined_kinds``) or the real MinED map.
        vocab_method: ``align.vocab``: with ``exact``, MinED mass counts as lost.
    """
    by = np.bincount(kind, weights=gold.astype(np.float64), minlength=3)
    total = max(1.0, float(by.sum()))
    exact, mined, lost = by[KIND_EXACT] / total, by[KIND_MINED] / total, by[KIND_UNMAPPED] / total
    if vocab_method == "exact":
        lost, mined = lost + mined, 0.0
    return {
        "basis": MASS_ESTIMATE_BASIS,
        "vocab_method": vocab_method,
        "exact": float(exact),
        "mined": float(mined),
        "lost": float(lost),
        "positions": int(gold.sum()),
    }


def mass_from_topk(
    ids: np.ndarray, logprobs: np.ndarray, vmap: VocabMap, vocab_method: str
) -> dict[str, Any]:
    """Measured top-k mass shares: real teacher top-k remapped with ``remap_topk``.

    Args:
        ids: (N, K) source top-k ids from a real forward pass.
        logprobs: (N, K) their log-probabilities.
        vmap: the MinED map, or ``kinds_map`` of the exact map (same statistics).
        vocab_method: ``align.vocab``.
    """
    _, _, stats = remap_topk(ids, logprobs, vmap)
    f = stats.fractions()
    exact, mined, lost = f["exact"], f["mined"], f["lost"]
    if vocab_method == "exact":
        lost, mined = lost + mined, 0.0
    return {
        "basis": "measured: the source model's real top-k on the sample, remapped",
        "vocab_method": vocab_method,
        "exact": float(exact),
        "mined": float(mined),
        "lost": float(lost),
        "positions": int(stats.rows),
        "topk_mass_mean": stats.total / max(1, stats.rows),
        "merged_entries": int(stats.merged),
    }


# --------------------------------------------------------------------------- the pair


@dataclass
class PairInputs:
    """What ``analyze_pair`` needs about one source -> target pair."""

    texts: list[str]
    src: SampleTokens
    tgt: SampleTokens
    src_surface: VocabSurface
    tgt_surface: VocabSurface
    vocab_method: str = "mined"
    build_mined_map: bool = False


def align_sample(texts: list[str], src: SampleTokens, tgt: SampleTokens) -> dict[str, Any]:
    """Offsets alignment over the sample: coverage and one-to-one share.

    Returns:
        ``AlignStats.summary()`` plus ``method``, ``many_to_one_share``, ``documents``.
    """
    total = AlignStats()
    for text, s, t in zip(texts, src.blocks, tgt.blocks, strict=True):
        matched = offsets_method(text, s, t)
        total = total + alignment_stats(matched, t.special())
    out = total.summary()
    out["many_to_one_share"] = total.many_to_one / max(1, total.predictive)
    out["method"] = "offsets"
    out["documents"] = len(texts)
    return out


def analyze_pair(p: PairInputs) -> dict[str, Any]:
    """Vocabulary overlap, alignment coverage, expected mass and examples of one pair.

    Returns:
        A dict with ``identical_tokenizer``, ``vocab``, ``alignment``, ``mass_estimate``,
        ``unmapped_examples`` and the private ``_maps`` (exact map, kinds map, MinED map
        or None) for the measured mass; the caller drops ``_maps`` before output.
    """
    import time

    exact = build_vocab_map(p.src_surface, p.tgt_surface, "exact")
    vocab = vocab_overlap(exact, p.src_surface, p.tgt_surface)
    mined_map = None
    vocab["mined_map"] = {"built": False, "seconds": None}
    if p.build_mined_map:
        t0 = time.perf_counter()
        mined_map = build_vocab_map(p.src_surface, p.tgt_surface, "mined")
        vocab["mined_map"] = {"built": True, "seconds": round(time.perf_counter() - t0, 2)}
    kind = mined_map.kind if mined_map is not None else mined_kinds(exact, p.src_surface)
    gold = p.src.gold_counts()
    return {
        "identical_tokenizer": p.src_surface.fingerprint == p.tgt_surface.fingerprint,
        "vocab": vocab,
        "alignment": align_sample(p.texts, p.src, p.tgt),
        "mass_estimate": mass_from_counts(gold, kind, p.vocab_method),
        "unmapped_examples": unmapped_examples(
            gold, exact, p.src_surface, p.tgt_surface, mined_map
        ),
        "_maps": (exact, kinds_map(exact, kind), mined_map),
    }


def _check(name: str, value: float | None, higher_is_better: bool = True) -> dict[str, Any]:
    th = THRESHOLDS[name]
    if value is None:
        return {"name": name, "value": None, "grade": None, **th}
    if higher_is_better:
        grade = "good" if value >= th["good"] else "usable" if value >= th["usable"] else "poor"
    else:
        grade = "good" if value <= th["good"] else "usable" if value <= th["usable"] else "poor"
    return {"name": name, "value": value, "grade": grade, **th}


def grade_pair(
    coverage: float | None,
    mass: dict[str, Any] | None,
    rewrites: list[str],
    unk: dict[str, float],
    errors: list[str],
) -> tuple[str, list[dict[str, Any]], list[str]]:
    """The verdict of one pair (see the module docstring for the thresholds).

    Args:
        coverage: offsets-alignment coverage on the sample (None: not measured).
        mass: the mass shares used (measured if available, else the estimate).
        rewrites: names of the sides whose tokenizer rewrites text (normalizers).
        unk: side name -> share of its sample tokens that are the unknown token.
        errors: problems that make the pair unusable (tokenizer cannot be loaded...).

    Returns:
        ``(verdict, checks, reasons)``; reasons explain every check that is not good.
    """
    checks = [
        _check("coverage", coverage),
        _check("exact_mass", None if mass is None else mass["exact"]),
        _check("lost_mass", None if mass is None else mass["lost"], higher_is_better=False),
    ]
    reasons = list(errors)
    labels = {
        "coverage": "offsets-alignment coverage",
        "exact_mass": "teacher mass mapping exactly",
        "lost_mass": "teacher mass lost by the vocabulary map",
    }
    for c in checks:
        if c["grade"] in ("usable", "poor"):
            at = "at least" if c["name"] != "lost_mass" else "at most"
            reasons.append(
                f"{labels[c['name']]} {c['value']:.1%} ({c['grade']}; good is {at} "
                f"{c['good']:.0%}, usable {at} {c['usable']:.0%})"
            )
    grades = [c["grade"] for c in checks if c["grade"]]
    if rewrites:
        checks.append({"name": "normalisation", "value": rewrites, "grade": "usable"})
        grades.append("usable")
        reasons.append(
            f"{' and '.join(rewrites)} rewrites text (lower-casing/accents/NFKC): mapped "
            "tokens are compared after that rewrite"
        )
    for side, share in unk.items():
        if share > UNK_SHARE_LIMIT:
            checks.append({"name": "unk", "value": share, "grade": "usable"})
            grades.append("usable")
            reasons.append(f"{share:.1%} of {side}'s sample tokens are its unknown token")
    if errors:
        grades.append("poor")
    return worst(grades), checks, reasons
