"""Stage 4, fusion: pure functions that fuse the aligned sources' sparse distributions.

A package of two modules: :mod:`~fuselm.fuse.rules` (the fusion rules MinCE/AvgCE, their
contract and the name -> function table) and :mod:`~fuselm.fuse.kernels` (the shared
tensor internals: input checks, weights, sparse mixture). The public names are re-exported
here, so callers import from ``fuselm.fuse``.
"""

from fuselm.fuse.rules import (
    DEFAULT_TAU,
    FUSION_FUNCTIONS,
    FusionResult,
    Level,
    Weighting,
    avg_ce,
    fill_fallback,
    get_fusion,
    min_ce,
    per_byte_ce,
    stack_sources,
)

__all__ = [
    "DEFAULT_TAU",
    "FUSION_FUNCTIONS",
    "FusionResult",
    "Level",
    "Weighting",
    "avg_ce",
    "fill_fallback",
    "get_fusion",
    "min_ce",
    "per_byte_ce",
    "stack_sources",
]
