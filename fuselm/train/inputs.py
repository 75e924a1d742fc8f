"""The train stage's input: the training split as rows for every variant.

Why a module of its own: :mod:`fuselm.train.data` and :mod:`fuselm.train.stream` are the
mechanics (join, fuse, fallback, rows; in memory or streamed); this module is the stage's
choice between them under the config (``train.streaming``, ``capture.mode: online``), the
fusion settings taken from ``fuse``/``align``, one read of every alignment shared by all
variants, and the errors a user sees when the split cannot train. Kept out of
:mod:`fuselm.train.stage` so that the stage reads as skip / resume / train / manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fuselm.artifacts import StageError
from fuselm.config import PipelineConfig
from fuselm.train.data import FusionSpec, TrainDataError, build_examples, join_sources
from fuselm.train.online import OnlineTeachers
from fuselm.train.stream import AlignedShards, StreamingExamples, merge_fusion_stats
from fuselm.train.variants import variant_teachers

log = logging.getLogger("fuselm.train")


def _fusion_spec(cfg: PipelineConfig) -> FusionSpec:
    return FusionSpec(
        function=cfg.fuse.function,
        level=cfg.fuse.level,
        fallback=cfg.align.fallback,
        max_k=cfg.fuse.max_k,
        avg_weighting=cfg.fuse.avg_weighting,
        avg_temperature=cfg.fuse.avg_temperature,
        positions=cfg.fuse.positions,
        gate=cfg.fusion_gate(),
        gate_scale=cfg.fuse.gate_scale,
        target=cfg.target.resolved_name() if cfg.target.as_source else "",
    )


def _stream_data(
    cfg: PipelineConfig, run_dir: Path, teachers: list[str], variants: list[str]
) -> dict[str, StreamingExamples]:
    """Streaming sources of rows for every variant (offline shards or online teachers).

    One reader serves all variants; a pairwise variant fuses only its own teachers' blocks.
    """
    try:
        if cfg.capture.mode == "online":
            reader: Any = OnlineTeachers(cfg, run_dir, "train")
        else:
            reader = AlignedShards(run_dir, teachers, "train", cache=2 * cfg.train.shuffle_shards)
        out = {
            variant: StreamingExamples(
                reader,
                teachers if variant == "control" else variant_teachers(cfg, variant),
                None if variant == "control" else _fusion_spec(cfg),
                cfg.train.seq_len,
                cfg.train.shuffle_shards,
            )
            for variant in variants
        }
    except TrainDataError as e:
        raise StageError(f"train: {e}") from None
    if not len(next(iter(out.values()))):
        raise StageError("train: the training split has no block with two or more tokens")
    return out


def _gathered_fusion(state: Any, data: StreamingExamples, teachers: list[str]) -> Any:
    """The fusion counts of all processes, summed (each fused its own rows' blocks)."""
    from dataclasses import asdict

    mine = asdict(data.fusion)
    parts = [mine]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([mine])
    return merge_fusion_stats(parts, teachers)


def _load_data(
    cfg: PipelineConfig, run_dir: Path, teachers: list[str], variants: list[str]
) -> dict[str, Any]:
    """Join, fuse and cut the training split: rows for every variant.

    Every alignment is read once; a pairwise variant fuses the pivot's and one source's
    records out of the same join (no capture or alignment is redone per pair).
    """
    from fuselm.align.store import load_aligned

    if cfg.train.streaming or cfg.capture.mode == "online":
        return _stream_data(cfg, run_dir, teachers, variants)
    sources = {n: load_aligned(run_dir, n, "train") for n in teachers}
    try:
        joined = join_sources(sources, split="train")
        spec = _fusion_spec(cfg)
        out: dict[str, Any] = {}
        for variant in variants:
            if variant == "control":
                out[variant] = build_examples(joined, teachers, None, cfg.train.seq_len)
                continue
            mine = variant_teachers(cfg, variant)
            pick = [teachers.index(n) for n in mine]
            sub = [(h, [blocks[i] for i in pick]) for h, blocks in joined]
            out[variant] = build_examples(sub, mine, spec, cfg.train.seq_len)
    except TrainDataError as e:
        raise StageError(f"train: {e}") from None
    first = next(iter(out.values()))
    if not first.examples:
        raise StageError("train: the training split has no block with two or more tokens")
    if first.split_blocks:
        log.info(
            "train: %d blocks longer than train.seq_len=%d were split into overlapping rows",
            first.split_blocks,
            cfg.train.seq_len,
        )
    return out
