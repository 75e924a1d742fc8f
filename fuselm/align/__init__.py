"""Align source LM predictions onto the target's positions and vocabulary (stage 3).

Pure functions on arrays: no file I/O, no model loading. The align stage (``stage.py``,
its per-block step in ``step.py``; ``fuselm align``) reads captures, calls these, and
writes shards in the format of ``store.py``, whose readers (``iter_aligned``,
``load_aligned``) are re-exported here.

- ``surface``: what text each vocabulary entry stands for, per tokenizer family.
- ``offsets``: token alignment from character offsets (exact, near-linear).
- ``dtw``: token alignment by DP over token strings (the paper's method, vectorised);
  ``verify`` checks its pairings against the text, ``tokenseq`` is their shared record.
- ``vocab``: EM / MinED vocabulary maps and top-k remapping with mass accounting.
- ``diagnostics``: coverage and one-to-one shares.

Variants are picked by name from the explicit tables below.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fuselm.align.diagnostics import AlignStats, alignment_stats
from fuselm.align.dtw import TokenSeq, align_mined_dp, dtw_path
from fuselm.align.methods import Tokenized, mined_dp_method, offsets_method, tokenize
from fuselm.align.offsets import (
    align_offsets,
    fallback_targets,
    offsets_cover_text,
    special_positions,
    token_boundaries,
)
from fuselm.align.records import AlignedBlock
from fuselm.align.store import align_manifest, iter_aligned, load_aligned
from fuselm.align.surface import VocabSurface, detect_family, vocab_surface
from fuselm.align.vocab import (
    KIND_EXACT,
    KIND_MINED,
    KIND_UNMAPPED,
    RemapStats,
    VocabMap,
    build_vocab_map,
    remap_topk,
    top_unmapped,
)

# name -> (function(text, src: Tokenized, tgt: Tokenized) -> (m,) int64, description)
ALIGN_METHODS: dict[str, tuple[Callable, str]] = {
    "offsets": (
        offsets_method,
        "exact token alignment from character offsets of the same text, O(n+m) "
        "(SPEC 3; replaces the paper's DP when both tokenizers give offsets)",
    ),
    "mined_dp": (
        mined_dp_method,
        "DTW over token strings with edit-distance cost, verified against the spelled "
        "text (FuseLLM, arXiv 2401.10491, sec. 3.3)",
    ),
}

# name -> (function(src_tok, tgt_tok) -> VocabMap, description)
VOCAB_METHODS: dict[str, tuple[Callable, str]] = {
    "exact": (
        partial(build_vocab_map, method="exact"),
        "EM: same normalised surface form, word-start marker included "
        "(FuseLLM, arXiv 2401.10491, sec. 3.3)",
    ),
    "mined": (
        partial(build_vocab_map, method="mined"),
        "MinED: exact match, else minimum edit distance, ties to the lowest target id "
        "(FuseLLM, arXiv 2401.10491, sec. 3.3)",
    ),
}


def _get(table: dict[str, tuple[Callable, str]], kind: str, name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {kind} method {name!r}; valid: {', '.join(sorted(table))}")
    return table[name][0]


def get_align_method(name: str) -> Callable:
    """Look up a token alignment method by name.

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    return _get(ALIGN_METHODS, "alignment", name)


def get_vocab_method(name: str) -> Callable:
    """Look up a vocabulary mapping method by name.

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    return _get(VOCAB_METHODS, "vocabulary mapping", name)


__all__ = [
    "ALIGN_METHODS",
    "AlignedBlock",
    "KIND_EXACT",
    "KIND_MINED",
    "KIND_UNMAPPED",
    "VOCAB_METHODS",
    "AlignStats",
    "RemapStats",
    "TokenSeq",
    "Tokenized",
    "VocabMap",
    "VocabSurface",
    "align_mined_dp",
    "align_manifest",
    "align_offsets",
    "alignment_stats",
    "build_vocab_map",
    "detect_family",
    "dtw_path",
    "fallback_targets",
    "get_align_method",
    "get_vocab_method",
    "iter_aligned",
    "load_aligned",
    "offsets_cover_text",
    "remap_topk",
    "special_positions",
    "token_boundaries",
    "tokenize",
    "top_unmapped",
    "vocab_surface",
]
