"""Stage 3, align: every teacher's captured top-k, moved onto the target's tokens and vocab.

Reading top to bottom: ``run_align`` loads the target's tokenizer and loops over the
teachers (the target first when it is also a source); ``align_source`` checks one
source's capture against the prepare output and the configured tokenizer, decides the
alignment method, builds (or loads from the cache) the vocabulary map, decides skip /
resume / run; ``_align_shard`` (in :mod:`fuselm.align.step`) joins one capture shard
with the prepare texts and the target's tokens by hash and encodes the records;
``align_block`` is the whole per-block
computation on arrays (token alignment, top-k remap, gold and byte counts); ``_finish``
writes the manifest with the diagnostics, summed from the shards' metadata.

Joins: a capture block and the target's tokens of the same text are matched by the
block's content **hash**, never by row (SPEC 3, research-code defect). The shard *names*
only locate candidates: capture shard ``<prepare shard>-NNN`` holds a slice of that prepare
shard, so the target's capture shard of the same name holds the same blocks. A hash found
on one side only means the two captures saw different texts: that is an error naming the
source and the block.

Normalising tokenizers (lower-casing, accent stripping, NFKC: SPEC 3b) report offsets
into the raw text while their tokens read differently. Policy under ``align.method:
offsets`` (the default; ``mined_dp`` never reads offsets): a tokenizer that *declares*
such a normalizer in its ``tokenizer.json``
makes the whole source use ``mined_dp`` (a warning says so, the manifest records
``method_used``); an undeclared one is caught per block (capture's ``text_roundtrip`` is
False and ``offsets_cover_text`` fails) and that block uses ``mined_dp``, counted in the
diagnostics. We fall back rather than refuse because ``mined_dp`` is verified against the
canonical (case-folded, accent-free) text, so its matches stay correct; the cost is lower
coverage, which the diagnostics show.

The target as a source (the paper's source #0) is aligned by identity: same tokens, same
vocabulary, every position valid. It is still written, so that training reads every
teacher the same way.

Byte accounting (for per-byte cross-entropies, SPEC 4): each source position predicts the
bytes between the end of its token and the end of the next one (``token_byte_ends``), so
a block's positions partition its text from the end of the first token (byte 0 after a
BOS) to the block end. ``nll_sum`` sums the source's gold log-probabilities over the
positions that predict text; positions predicting a control token (EOS, SEP) predict no
bytes and are left out.

Vocabulary maps are cached per tokenizer pair as ``<run_dir>/align/vocab-<key>.npz``
(files, not folders, so ``fuselm status`` does not list them as stages).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.align import store
from fuselm.align.blocks import (
    IDENTITY,
    identity_map,
)
from fuselm.align.chat_blocks import chat_sides_for
from fuselm.align.inputs import _checked_capture, _PrepareBlocks, _TargetSide
from fuselm.align.step import _align_shard, choose_method
from fuselm.align.summary import _finish, summary_line
from fuselm.align.surface import VocabSurface, vocab_surface
from fuselm.align.vocab import (
    VocabMap,
    vocab_map_fingerprint,
)
from fuselm.artifacts import (
    Stage,
    StageError,
    atomic_write_bytes,
    fingerprint,
    tokenizer_digest,
    write_parquet_atomic,
)
from fuselm.config import ModelConfig, PipelineConfig, to_dict

log = logging.getLogger("fuselm.align")


def load_or_build_vocab_map(
    cache_dir: Path, src: VocabSurface, tgt: VocabSurface, method: str
) -> tuple[VocabMap, float, bool]:
    """The vocabulary map for a tokenizer pair, from ``cache_dir`` or built (and cached).

    The cache key is ``VocabMap.fingerprint`` (both tokenizers' content, the method and
    the algorithm version), so any change to either tokenizer rebuilds the map. Writes are
    atomic; a cache file that does not fit (other sizes, unreadable) is rebuilt.

    Returns:
        ``(map, seconds spent building, whether it came from the cache)``.
    """
    from fuselm.align import get_vocab_method

    fp = vocab_map_fingerprint(src, tgt, method)
    path = cache_dir / f"vocab-{fp[:32]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                vmap = VocabMap(
                    src_to_tgt=z["src_to_tgt"].astype(np.int32),
                    kind=z["kind"].astype(np.uint8),
                    method=str(z["method"]),
                    fingerprint=str(z["fingerprint"]),
                    tgt_size=int(z["tgt_size"]),
                )
            if vmap.fingerprint == fp and len(vmap) == len(src) and vmap.tgt_size == len(tgt):
                return vmap, 0.0, True
        except (OSError, ValueError, KeyError) as e:
            log.warning("align: vocabulary map cache %s is unreadable (%s); rebuilding", path, e)
    t0 = time.perf_counter()
    vmap = get_vocab_method(method)(src, tgt)
    seconds = time.perf_counter() - t0
    buf = io.BytesIO()
    np.savez(
        buf,
        src_to_tgt=vmap.src_to_tgt,
        kind=vmap.kind,
        method=np.array(vmap.method),
        fingerprint=np.array(vmap.fingerprint),
        tgt_size=np.array(vmap.tgt_size),
    )
    atomic_write_bytes(path, buf.getvalue())
    return vmap, seconds, False


# --------------------------------------------------------------------------- the stage


def run_align(cfg: PipelineConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run the align stage for every teacher into ``<run_dir>/align/<name>/``.

    Under torchrun / accelerate the shards are split across the processes like capture's
    (rank 0 decides skip/resume and writes the manifest once every shard file exists), so
    alignment scales with CPU cores and nodes instead of running on one core.

    Returns:
        ``{"stage": "align", "stats": {name: stats}, "sources": {name: manifest}}``.
    """
    teachers = cfg.teachers()
    if not teachers:
        raise StageError("align: no teachers configured; set sources (and/or target.as_source)")
    if cfg.capture.mode == "online":
        log.info("align: capture.mode is online; alignment happens inside `fuselm train`")
        return {"stage": "align", "stats": {}, "sources": {}, "skipped": "online"}
    run_dir = Path(run_dir)
    prep = Stage(run_dir, "prepare").manifest()
    if prep is None:
        raise StageError(f"{run_dir}/prepare is not finished; run `fuselm prepare` first")
    target = _TargetSide(cfg, run_dir, prep["fingerprint"])
    prepared = _PrepareBlocks(run_dir)
    from fuselm.capture.stage import _Ranks

    manifests = {}
    with _Ranks() as ranks:
        for m in teachers:
            name = m.resolved_name()
            manifests[name] = align_source(cfg, m, run_dir, prep, target, prepared, force, ranks)
            if ranks.rank == 0:
                print(summary_line(name, target.name, manifests[name].get("stats", {})))
    return {
        "stage": "align",
        "stats": {name: man.get("stats", {}) for name, man in manifests.items()},
        "sources": manifests,
    }


def align_components(
    cfg: PipelineConfig, prep_fp: str, source_capture_fp: str, target: Any, vmap_fp: str
) -> dict[str, Any]:
    """Everything one source's alignment depends on (its fingerprint is the stage identity).

    ``align.fallback`` is left out on purpose: the records carry ``valid`` and the
    consumer applies the fallback, so changing it needs no new alignment.
    """
    identity = vmap_fp.startswith(f"{IDENTITY}:")
    return {
        "format": store.FORMAT_VERSION,
        "prepare": prep_fp,
        "source": source_capture_fp,
        "target": target,
        "align": IDENTITY if identity else {"method": cfg.align.method, "vocab": cfg.align.vocab},
        "vocab_map": vmap_fp,
    }


def current_components(
    cfg: PipelineConfig, name: str, prepare_fp: str, capture_fp: Callable[[ModelConfig], str]
) -> dict[str, Any] | None:
    """The components ``align/<name>`` would have if run now (for ``fuselm status -c``).

    Args:
        cfg: the current pipeline configuration.
        name: the teacher's name.
        prepare_fp: the fingerprint the prepare stage would have now.
        capture_fp: the fingerprint a teacher's capture would have now.

    Returns:
        The components dict, or None when ``name`` is not a teacher of ``cfg``.
    """
    from fuselm.models import ensure_fast_tokenizer, load_tokenizer

    m = next((t for t in cfg.teachers() if t.resolved_name() == name), None)
    if m is None or not cfg.target.model:
        return None
    tgt_tok, _ = ensure_fast_tokenizer(cfg.target, load_tokenizer(cfg.target))
    tgt_surface = vocab_surface(tgt_tok)
    if cfg.target.as_source:
        target: Any = capture_fp(cfg.target)
    else:
        target = {"tokenizer": tokenizer_digest(tgt_tok), "bos": cfg.target.bos}
    if m is cfg.target:
        vmap_fp = f"{IDENTITY}:{tgt_surface.fingerprint}"
    else:
        src_tok, _ = ensure_fast_tokenizer(m, load_tokenizer(m))
        vmap_fp = vocab_map_fingerprint(vocab_surface(src_tok), tgt_surface, cfg.align.vocab)
    return align_components(cfg, prepare_fp, capture_fp(m), target, vmap_fp)


def align_source(
    cfg: PipelineConfig,
    m: ModelConfig,
    run_dir: Path,
    prep: dict[str, Any],
    target: _TargetSide,
    prepared: _PrepareBlocks,
    force: bool,
    ranks: Any = None,
) -> dict[str, Any]:
    """Align one teacher onto the target (skip, resume or run); return its manifest.

    With several processes (``ranks``), rank 0 decides and builds the vocabulary map (the
    others then read it from the cache), every rank aligns every N-th missing shard, and
    rank 0 writes the manifest; the output does not depend on N.
    """
    from fuselm.capture.stage import _wait_for_manifest, _wait_for_shards

    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    from fuselm.models import ensure_fast_tokenizer, load_tokenizer

    name = m.resolved_name()
    is_target = m is cfg.target
    if is_target:
        tokenizer, src_surface = target.tokenizer, target.surface
        cap_man = _checked_capture(run_dir, m, target.digest, prep["fingerprint"])
    else:
        tokenizer, _ = ensure_fast_tokenizer(m, load_tokenizer(m))
        src_surface = vocab_surface(tokenizer)
        cap_man = _checked_capture(run_dir, m, tokenizer_digest(tokenizer), prep["fingerprint"])

    declared, method_used = choose_method(cfg, name, is_target, src_surface, target)
    vmap_fp = (
        f"{IDENTITY}:{src_surface.fingerprint}"
        if is_target
        else vocab_map_fingerprint(src_surface, target.surface, cfg.align.vocab)
    )
    components = align_components(
        cfg, prep["fingerprint"], cap_man["fingerprint"], target.identity, vmap_fp
    )
    shards = [s["name"] for s in cap_man["shards"]]
    stage = Stage(run_dir, f"align/{name}")
    decision: dict[str, Any] = {}
    if rank == 0:
        try:
            man = stage.manifest()
            if man is not None and man.get("fingerprint") == fingerprint(components):
                if not force and stage.reopen():
                    log.warning("align %s: shards are missing; redoing only those", name)
            state = stage.begin(
                components,
                {"source": name, "target": target.name, **to_dict(cfg.align)},
                shards,
                force=force,
            )
            todo = [] if state == "skip" else [s for s in shards if not stage.has_shard(s)]
            if state != "skip" and not is_target:  # build (and cache) once, before the others
                load_or_build_vocab_map(
                    run_dir / "align", src_surface, target.surface, cfg.align.vocab
                )
            decision = {"state": state, "todo": todo}
        except StageError as e:
            decision = {"state": "error", "message": str(e)}
    if ranks is not None:
        decision = ranks.broadcast(decision)
    if decision["state"] == "error":
        raise StageError(decision["message"])
    if decision["state"] == "skip":
        log.info("align %s: up to date in %s (skipped)", name, stage.path)
        return stage.manifest() or {}
    todo = decision["todo"]
    if len(todo) < len(shards) and rank == 0:
        log.info("align %s: resuming, %d of %d shards to do", name, len(todo), len(shards))
    mine = todo[rank::world]

    if is_target:
        vmap, vmap_s, cached = identity_map(src_surface), 0.0, True
    else:
        vmap, vmap_s, cached = load_or_build_vocab_map(
            run_dir / "align", src_surface, target.surface, cfg.align.vocab
        )
        log.info(
            "align %s: vocabulary map (%s) %s: %s",
            name,
            cfg.align.vocab,
            "from cache" if cached else f"built in {vmap_s:.1f} s",
            vmap.counts(),
        )
    from fuselm.progress import progress

    chat_sides = chat_sides_for(cfg, m, prep, tokenizer, src_surface, target)
    cap_stage = Stage(run_dir, f"capture/{name}")
    total = sum(_capture_rows(cap_stage.shard_path(s)) for s in mine)
    who = f" [rank {rank}/{world}]" if world > 1 else ""
    bar = progress(total=total, desc=f"align {name}{who}", unit="block")
    started = time.perf_counter()
    done_pos = 0
    for shard in mine:
        rows, totals, k = _align_shard(
            cap_stage.shard_path(shard),
            shard,
            name=name,
            target=target,
            prepared=prepared,
            src_surface=src_surface,
            vmap=vmap,
            method_used=method_used,
            chat_sides=chat_sides,
        )
        table = store.to_table(
            rows,
            k,
            {"source": name, "target": target.name, "diagnostics": totals.to_meta()},
        )
        write_parquet_atomic(stage.shard_path(shard), table, **store.parquet_options())
        done_pos += totals.positions
        bar.update(totals.blocks)
        bar.set_postfix_str(f"{done_pos / max(time.perf_counter() - started, 1e-9):,.0f} pos/s")
        log.info(
            "align %s%s: shard %s: %d blocks, %d positions, %d with a teacher -> %s",
            name,
            who,
            shard,
            totals.blocks,
            totals.positions,
            totals.valid,
            stage.shard_path(shard),
        )
    bar.close()
    seconds = time.perf_counter() - started
    if rank != 0:
        return _wait_for_manifest(stage, components)
    _wait_for_shards(stage, shards)
    return _finish(
        stage,
        shards,
        name=name,
        target=target.name,
        method=cfg.align.method if not is_target else IDENTITY,
        method_used=method_used,
        vocab=IDENTITY if is_target else cfg.align.vocab,
        vmap=vmap,
        vmap_seconds=vmap_s,
        vmap_cached=cached,
        declared=declared,
        src_surface=src_surface,
        expected_blocks=int(prep.get("stats", {}).get("blocks", -1)),
        seconds=seconds,
        positions_done=done_pos,
    )


def _capture_rows(path: Path) -> int:
    """Rows of a capture shard, or a StageError naming it when it is not readable Parquet."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # ArrowInvalid / OSError: damaged after the capture finished
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StageError(
            f"align: capture shard {path} is unreadable ({first}); delete it and rerun "
            "`fuselm capture` (only the missing shard is captured again), then `fuselm align`"
        ) from None
