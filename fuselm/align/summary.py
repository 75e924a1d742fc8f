"""The align stage's figures: running totals over shards, the manifest, the printed summary.

Every manifest figure is summed from per-shard metadata, so a resumed or multi-process run
reports the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fuselm.align import store
from fuselm.align.blocks import (
    BlockDiag,
)
from fuselm.align.diagnostics import AlignStats
from fuselm.align.records import AlignedBlock
from fuselm.align.surface import VocabSurface, to_text
from fuselm.align.vocab import (
    RemapStats,
)
from fuselm.artifacts import (
    Stage,
    StageError,
)

log = logging.getLogger("fuselm.align")

TOP_UNMAPPED = 10  # in the manifest and the printed summary
_SHARD_UNMAPPED = 200  # unmapped source ids kept per shard (summed at the end)
_EXAMPLES = 3


@dataclass
class _Totals:
    """A source's diagnostics, summed over shards (and stored per shard)."""

    blocks: int = 0
    positions: int = 0
    valid: int = 0
    align: AlignStats = field(default_factory=AlignStats)
    remap: RemapStats = field(default_factory=RemapStats)
    rows_without_mass: int = 0
    unmapped: dict[int, list[float]] = field(default_factory=dict)  # id -> [count, mass]
    blocks_mined_dp: int = 0
    examples: list[Any] = field(default_factory=list)
    nll_sum: float = 0.0
    nll_bytes: int = 0

    def add(self, rec: AlignedBlock, d: BlockDiag) -> None:
        self.blocks += 1
        self.positions += rec.n_positions
        self.valid += int(rec.valid.sum())
        self.align = self.align + d.align
        self.remap = self.remap + d.remap
        self.rows_without_mass += d.rows_without_mass
        if len(d.unmapped_ids):
            u, inv = np.unique(d.unmapped_ids, return_inverse=True)
            counts = np.bincount(inv)
            mass = np.bincount(inv, weights=d.unmapped_mass)
            for i, c, w in zip(u.tolist(), counts.tolist(), mass.tolist(), strict=True):
                e = self.unmapped.setdefault(i, [0, 0.0])
                e[0] += c
                e[1] += w
        self.nll_sum += rec.nll_sum
        self.nll_bytes += rec.nll_bytes

    def to_meta(self) -> dict[str, Any]:
        top = sorted(self.unmapped.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
        return {
            "blocks": self.blocks,
            "positions": self.positions,
            "valid": self.valid,
            "align": asdict(self.align),
            "remap": {k: v for k, v in asdict(self.remap).items() if k != "extra"},
            "rows_without_mass": self.rows_without_mass,
            "unmapped": [[i, c, w] for i, (c, w) in top[:_SHARD_UNMAPPED]],
            "blocks_mined_dp": self.blocks_mined_dp,
            "examples": self.examples[:_EXAMPLES],
            "nll_sum": self.nll_sum,
            "nll_bytes": self.nll_bytes,
        }

    def merge_meta(self, d: dict[str, Any]) -> None:
        self.blocks += d["blocks"]
        self.positions += d["positions"]
        self.valid += d["valid"]
        self.align = self.align + AlignStats(**d["align"])
        self.remap = self.remap + RemapStats(**d["remap"])
        self.rows_without_mass += d["rows_without_mass"]
        for i, c, w in d["unmapped"]:
            e = self.unmapped.setdefault(int(i), [0, 0.0])
            e[0] += c
            e[1] += w
        self.blocks_mined_dp += d["blocks_mined_dp"]
        self.examples.extend(d["examples"][: _EXAMPLES - len(self.examples)])
        self.nll_sum += d["nll_sum"]
        self.nll_bytes += d["nll_bytes"]


def _finish(stage: Stage, shards: list[str], **info: Any) -> dict[str, Any]:
    """Write the manifest; every figure is summed from the shards' metadata."""
    import pyarrow.parquet as pq

    totals = _Totals()
    size = n_rows = 0
    for s in shards:
        path = stage.shard_path(s)
        totals.merge_meta(store.shard_metadata(path)["diagnostics"])
        size += path.stat().st_size
        n_rows += pq.ParquetFile(path).metadata.num_rows
    name = info["name"]
    if info["expected_blocks"] >= 0 and n_rows != info["expected_blocks"]:
        raise StageError(
            f"align: source '{name}': {n_rows} blocks aligned but prepare has "
            f"{info['expected_blocks']}: its capture is incomplete or from another prepare "
            "run; re-run `fuselm capture --force`"
        )
    summary = totals.align.summary()
    pred = totals.align.predictive or 1
    surface: VocabSurface = info["src_surface"]
    top = sorted(totals.unmapped.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
    stats = {
        "target": info["target"],
        "method": info["method"],
        "method_used": info["method_used"],
        "vocab": info["vocab"],
        "blocks": totals.blocks,
        "positions": totals.positions,
        "predictive_positions": totals.align.predictive,
        "valid_positions": totals.valid,
        "coverage": summary["coverage"],
        "one_to_one_share": summary["one_to_one_share"],
        "many_to_one_share": totals.align.many_to_one / pred,
        "fallback_share": summary["fallback_share"],
        "topk_mass": totals.remap.fractions(),
        "merged_entries": totals.remap.merged,
        "rows_without_mass": totals.rows_without_mass,
        "top_unmapped": [
            {
                "token": surface.pieces[i],
                "text": to_text(surface.content[i]),
                "count": int(c),
                "mass": w,
            }
            for i, (c, w) in top[:TOP_UNMAPPED]
        ],
        "normalising": {
            "declared": info["declared"],
            "blocks_offsets_not_covering_text": totals.blocks_mined_dp,
            "examples": totals.examples,
        },
        "vocab_map": {
            "fingerprint": info["vmap"].fingerprint,
            "entries": info["vmap"].counts(),
            "cached": info["vmap_cached"],
            "seconds": round(info["vmap_seconds"], 3),
        },
        "ce_nats_per_byte": totals.nll_sum / totals.nll_bytes if totals.nll_bytes else None,
        "bytes": size,
        "bytes_per_position": round(size / totals.positions, 3) if totals.positions else None,
        "bytes_per_valid_position": round(size / totals.valid, 3) if totals.valid else None,
        "seconds": round(info["seconds"], 3),
        "positions_per_second": round(info["positions_done"] / info["seconds"], 1)
        if info["seconds"] > 0
        else None,
    }
    extra = {"format": {"version": store.FORMAT_VERSION, "step": store.STEP}}
    man = stage.finish(stats, extra)
    log.info("align %s: %d blocks -> %s", name, totals.blocks, stage.path)
    return man


def summary_line(name: str, target: str, stats: dict[str, Any]) -> str:
    """One printed line of diagnostics per source-target pair."""
    if not stats:
        return f"align {name}: no statistics"
    mass = stats["topk_mass"]
    unm = ", ".join(f"{u['token']!r} x{u['count']}" for u in stats["top_unmapped"][:5])
    norm = stats["normalising"]
    method = stats["method_used"]
    if norm["blocks_offsets_not_covering_text"]:
        method += f" (+mined_dp on {norm['blocks_offsets_not_covering_text']} blocks)"
    elif method != stats["method"]:
        method += f" (normalising tokenizer; {stats['method']} configured)"
    return (
        f"align {name} -> {target} [{method}, vocab {stats['vocab']}]: "
        f"{stats['blocks']} blocks, coverage {stats['coverage']:.1%} "
        f"(1:1 {stats['one_to_one_share']:.1%}), top-k mass exact {mass['exact']:.1%} / "
        f"mined {mass['mined']:.1%} / lost {mass['lost']:.1%}, "
        f"{stats['bytes_per_position'] or 0:.1f} B/position" + (f"; unmapped: {unm}" if unm else "")
    )
