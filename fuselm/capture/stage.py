"""Stage 2, capture: run each source LM once over the prepared blocks, store its top-k.

Reading top to bottom: ``run_capture`` loops over the teachers (the target first when it
is also a source); ``capture_source`` checks and loads one model, plans the shards from
the prepare shards, decides skip / resume / run, captures the shards this process owns
and writes the manifest; ``Capturer`` is the part that touches the model: tokenize with
offsets, batch by a token budget with length bucketing, forward, top-k in chunks
(``compute.topk_logprobs``), encode (``storage.encode_block``).

Scale-out: under ``torchrun --nproc_per_node N -m fuselm capture ...`` (or ``accelerate
launch``, which sets the same RANK / WORLD_SIZE / LOCAL_RANK variables) rank 0 decides
(skip, resume, or start over with --force) and broadcasts the list of missing shards;
rank r captures every N-th of them. Shard names derive from the prepare shards and
``capture.blocks_per_shard`` only, and each shard is computed by exactly one process with
the same batches as in a single-process run, so the output does not depend on N. Rank 0
writes the manifest once every shard file exists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from fuselm.artifacts import (
    Stage,
    StageError,
    fingerprint,
    text_digest,
    tokenizer_digest,
    write_parquet_atomic,
)
from fuselm.capture import storage
from fuselm.capture.runner import Block, Capturer, bos_added  # noqa: F401  (re-exported)
from fuselm.config import ModelConfig, PipelineConfig, to_dict

log = logging.getLogger("fuselm.capture")


class _Ranks:
    """This process's place in a torchrun / accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK).

    Why a process group is created here: rank 0 alone decides skip / resume / restart and
    which shards are missing, and every rank must act on that one decision (two ranks
    each clearing a --force run would delete each other's shards). gloo works on CPU and
    next to CUDA alike and is only used for this one broadcast; waiting for the other
    ranks' shards is done on the files, so a long shard never hits a collective timeout.
    """

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self._created = False
        if not 0 <= self.rank < self.world:
            raise StageError(f"RANK={self.rank} is not below WORLD_SIZE={self.world}")

    def __enter__(self) -> _Ranks:
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                if not os.environ.get("MASTER_ADDR"):
                    raise StageError(
                        "WORLD_SIZE > 1 but MASTER_ADDR is not set: start several processes "
                        "with `torchrun --nproc_per_node N -m fuselm capture ...` or "
                        "`accelerate launch --num_processes N -m fuselm capture ...`"
                    )
                dist.init_process_group("gloo", timeout=timedelta(hours=2))
                self._created = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._created:
            import torch.distributed as dist

            dist.destroy_process_group()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ShardPlan:
    """One capture shard: a slice of one prepare shard."""

    name: str
    prepare_file: Path
    start: int
    stop: int


def plan_shards(run_dir: Path, blocks_per_shard: int) -> list[ShardPlan]:
    """Capture shards derived from the prepare shards (independent of the process count).

    Prepare shard ``train-00003`` with 2,500 blocks and ``blocks_per_shard`` 1,000 gives
    ``train-00003-000`` .. ``train-00003-002``.
    """
    import pyarrow.parquet as pq

    from fuselm.corpus import block_shards

    plans = []
    for f in block_shards(run_dir):
        n = pq.ParquetFile(f).metadata.num_rows
        for j in range(max(1, math.ceil(n / blocks_per_shard))):
            start = j * blocks_per_shard
            plans.append(ShardPlan(f"{f.stem}-{j:03d}", f, start, min(n, start + blocks_per_shard)))
    return plans


def read_plan_blocks(plan: ShardPlan) -> list[Block]:
    """The blocks of one planned shard, in prepare order."""
    import pyarrow.parquet as pq

    from fuselm.chat import loads

    names = pq.ParquetFile(plan.prepare_file).schema_arrow.names
    cols = ["block_id", "hash", "text"] + (["messages"] if "messages" in names else [])
    t = pq.read_table(plan.prepare_file, columns=cols)
    t = t.slice(plan.start, plan.stop - plan.start)
    return [
        Block(r["block_id"], r["hash"], r["text"], loads(r.get("messages"))) for r in t.to_pylist()
    ]


def capture_components(
    cfg: PipelineConfig,
    m: ModelConfig,
    prepare_fp: str,
    tok_digest: str,
    dtype: str,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Everything a source's capture depends on (its fingerprint is the stage identity).

    Left out on purpose: ``batch_tokens`` and the device (they change speed and
    floating-point noise far below the 1/64-nat quantisation, not the content), and
    ``max_context`` (it only decides whether a block is refused).
    """
    from fuselm.models import model_identity

    out = {
        "format": storage.FORMAT_VERSION,
        "prepare": prepare_fp,
        "model": model_identity(m),
        "tokenizer": tok_digest,
        "capture": {
            "top_k": cfg.capture.top_k,
            "blocks_per_shard": cfg.capture.blocks_per_shard,
            "step": storage.STEP,
        },
        "bos": m.bos,
        "dtype": dtype,
    }
    if chat_template is not None:  # chat data: the rendering is part of the input
        out["chat_template"] = text_digest(chat_template)
    return out


def run_capture(cfg: PipelineConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run the capture stage for every teacher into ``<run_dir>/capture/<name>/``.

    Returns:
        ``{"stage": "capture", "stats": {name: stats}, "sources": {name: manifest}}``.
    """
    teachers = cfg.teachers()
    if not teachers:
        raise StageError(
            "capture: no models configured; set target.model (with as_source) and/or sources"
        )
    if cfg.capture.mode == "online":
        log.info("capture: capture.mode is online; the teachers run inside `fuselm train`")
        return {"stage": "capture", "stats": {}, "sources": {}, "skipped": "online"}
    prep = Stage(run_dir, "prepare").manifest()
    if prep is None:
        raise StageError(f"{run_dir}/prepare is not finished; run `fuselm prepare` first")
    manifests = {}
    with _Ranks() as ranks:
        for m in teachers:
            manifests[m.resolved_name()] = capture_source(cfg, m, Path(run_dir), prep, force, ranks)
    return {
        "stage": "capture",
        "stats": {name: man.get("stats", {}) for name, man in manifests.items()},
        "sources": manifests,
    }


def capture_source(
    cfg: PipelineConfig,
    m: ModelConfig,
    run_dir: Path,
    prep: dict[str, Any],
    force: bool,
    ranks: _Ranks,
) -> dict[str, Any]:
    """Capture one source (all of it, or this rank's share); return its manifest."""
    import torch

    from fuselm.models import (
        check_causal_lm,
        check_model_path,
        check_weights_format,
        ensure_fast_tokenizer,
        load_causal_lm,
        load_model_config,
        load_tokenizer,
        model_context,
        resolve_device,
        resolve_dtype,
    )

    name = m.resolved_name()
    stage = Stage(run_dir, f"capture/{name}")
    # Cheap checks first, so bad input fails before any weights load.
    check_model_path(m)
    check_causal_lm(m, load_model_config(m))
    check_weights_format(m)
    tokenizer, converted = ensure_fast_tokenizer(m, load_tokenizer(m))
    if converted:
        log.warning("capture %s: converted the slow tokenizer to a fast one (for offsets)", name)
    device = resolve_device(m.device, ranks.local_rank if ranks.world > 1 else None)
    dtype = resolve_dtype(m.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    template = run_chat_template(prep, m, tokenizer)
    components = capture_components(
        cfg, m, prep["fingerprint"], tokenizer_digest(tokenizer), dtype_name, template
    )
    plans = plan_shards(run_dir, cfg.capture.blocks_per_shard)
    names = [p.name for p in plans]

    # Rank 0 decides; everyone follows (see _Ranks).
    decision: dict[str, Any] = {}
    if ranks.rank == 0:
        try:
            man = stage.manifest()
            if man is not None and man.get("fingerprint") == fingerprint(components):
                if stage.reopen():  # finished, but shard files were deleted since
                    log.warning("capture %s: shards are missing; redoing only those", name)
            state = stage.begin(
                components, {"source": to_dict(m), **to_dict(cfg.capture)}, names, force=force
            )
            missing = [] if state == "skip" else [n for n in names if not stage.has_shard(n)]
            decision = {"state": state, "missing": missing}
        except StageError as e:
            decision = {"state": "error", "message": str(e)}
    decision = ranks.broadcast(decision)
    if decision["state"] == "error":
        raise StageError(decision["message"])
    if decision["state"] == "skip":
        log.info("capture %s: up to date in %s (skipped)", name, stage.path)
        return stage.manifest() or {}
    missing = decision["missing"]
    mine = [p for p in plans if p.name in set(missing[ranks.rank :: ranks.world])]
    if len(missing) < len(names) and ranks.rank == 0:
        log.info("capture %s: resuming, %d of %d shards to do", name, len(missing), len(names))

    model = None
    capturer = None
    if mine:
        model = load_causal_lm(m, device=device, dtype=dtype)
        capturer = Capturer(
            model,
            tokenizer,
            name=name,
            top_k=cfg.capture.top_k,
            batch_tokens=cfg.capture.batch_tokens,
            bos=m.bos,
            max_context=model_context(m),
            chat_template=template,
        )
        _capture_shards(capturer, stage, mine, ranks)
    del model, capturer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if ranks.rank != 0:
        return _wait_for_manifest(stage, components)
    _wait_for_shards(stage, names)
    return _finish(stage, cfg, m, tokenizer, names, converted, dtype_name)


def run_chat_template(prep: dict[str, Any], m: ModelConfig, tokenizer: Any) -> str | None:
    """The model's chat template when the prepared corpus holds conversations, else None.

    Raises:
        ChatTemplateError: conversations, but the model has no template (before any
            weights load).
    """
    from fuselm.chat import chat_template

    if not prep.get("stats", {}).get("conversations"):
        return None
    return chat_template(m, tokenizer)


def _capture_shards(capturer: Capturer, stage: Stage, mine: list[ShardPlan], ranks: _Ranks) -> None:
    from tqdm.auto import tqdm

    total = sum(p.stop - p.start for p in mine)
    who = f" [rank {ranks.rank}/{ranks.world}]" if ranks.world > 1 else ""
    bar = tqdm(
        total=total,
        desc=f"capture {capturer.name}{who}",
        unit="block",
        dynamic_ncols=True,
        position=ranks.rank if ranks.world > 1 else None,
    )
    started = time.perf_counter()
    tokens = 0

    def progress(n_blocks: int, n_tokens: int) -> None:
        nonlocal tokens
        tokens += n_tokens
        bar.update(n_blocks)
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")

    # Writing (zstd + fsync) overlaps with the next shard's forward passes; at most one
    # shard waits in memory.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        for plan in mine:
            blocks = read_plan_blocks(plan)
            t0 = time.perf_counter()
            capturer.pad_mass_sum = 0.0
            rows = capturer.capture(blocks, on_batch=progress)
            n_tok = sum(int(r["n_tokens"]) for r in rows)
            table = storage.to_table(
                rows,
                capturer.top_k,
                {
                    "source": capturer.name,
                    "vocab_size": capturer.vocab_size,
                    "embedding_rows": capturer.embedding_rows,
                    "pad_mass_sum": capturer.pad_mass_sum,
                },
            )
            if pending is not None:
                pending.result()
            pending = pool.submit(
                write_parquet_atomic,
                stage.shard_path(plan.name),
                table,
                **storage.parquet_options(),
            )
            log.info(
                "capture %s: shard %s: %d blocks, %d tokens, %.0f tok/s -> %s",
                capturer.name,
                plan.name,
                len(blocks),
                n_tok,
                n_tok / max(time.perf_counter() - t0, 1e-9),
                stage.shard_path(plan.name),
            )
        if pending is not None:
            pending.result()
    bar.close()


def _wait_for_shards(stage: Stage, names: list[str], poll_s: float = 0.5) -> None:
    """Rank 0: wait until every shard exists (other ranks may still be writing theirs)."""
    last = time.monotonic()
    while missing := [n for n in names if not stage.has_shard(n)]:
        if time.monotonic() - last > 60:
            log.info("capture: waiting for %d shards from other ranks", len(missing))
            last = time.monotonic()
        time.sleep(poll_s)


def _wait_for_manifest(stage: Stage, components: dict[str, Any], poll_s: float = 0.5) -> dict:
    """Ranks > 0: wait until rank 0 has written the manifest of this run."""
    fp = fingerprint(components)
    while True:
        with contextlib.suppress(StageError):  # a manifest being replaced mid-read
            man = stage.manifest()
            if man is not None and man.get("fingerprint") == fp:
                return man
        time.sleep(poll_s)


def _finish(
    stage: Stage,
    cfg: PipelineConfig,
    m: ModelConfig,
    tokenizer: Any,
    names: list[str],
    converted: bool,
    dtype_name: str,
) -> dict[str, Any]:
    """Write the manifest from the shard files.

    Every figure is read back from the shards, so resumed and multi-process runs report
    the same numbers as a single uninterrupted run.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    blocks = tokens = positions = roundtrip = max_tokens = 0
    size = 0
    pad_mass = 0.0
    vocab = rows = 0
    for n in names:
        path = stage.shard_path(n)
        info = storage.shard_metadata(path)
        t = pq.read_table(path, columns=["n_tokens", "n_positions", "text_roundtrip"])
        blocks += t.num_rows
        tokens += int(pc.sum(t["n_tokens"]).as_py() or 0)
        positions += int(pc.sum(t["n_positions"]).as_py() or 0)
        roundtrip += int(pc.sum(t["text_roundtrip"].cast("int32")).as_py() or 0)
        max_tokens = max(max_tokens, int(pc.max(t["n_tokens"]).as_py() or 0))
        size += path.stat().st_size
        pad_mass += float(info.get("pad_mass_sum", 0.0))
        vocab, rows = int(info["vocab_size"]), int(info["embedding_rows"])
    padded = rows > vocab
    stats = {
        "blocks": blocks,
        "tokens": tokens,
        "positions": positions,
        "bytes": size,
        "bytes_per_position": round(size / positions, 3) if positions else None,
        "top_k": cfg.capture.top_k,
        "vocab_size": vocab,
        "embedding_rows": rows,
        "padded_vocab": padded,
        "renormalised_over_real_vocab": padded,
        "padded_mass_mean": (pad_mass / positions) if padded and positions else 0.0,
        "bos": m.bos,
        "bos_added": bos_added(tokenizer, m.bos),
        "dtype": dtype_name,
        "max_block_tokens": max_tokens,
        "blocks_text_roundtrip": roundtrip,
    }
    extra = {
        "source": {
            "name": m.resolved_name(),
            "model": m.model,
            "tokenizer": m.tokenizer_path,
            "gguf_file": m.gguf_file,
            "revision": m.revision,
            "tokenizer_converted": converted,
            "tokenizer_len": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            # What this source was allowed to run or unpickle (both off by default).
            "trust_remote_code": m.trust_remote_code,
            "allow_pickle": m.allow_pickle,
        },
        "format": {"version": storage.FORMAT_VERSION, "k": cfg.capture.top_k, "step": storage.STEP},
    }
    man = stage.finish(stats, extra)
    log.info(
        "capture %s: %d blocks, %d positions, %.1f bytes/position%s -> %s",
        m.resolved_name(),
        blocks,
        positions,
        stats["bytes_per_position"] or 0.0,
        " (padded vocabulary renormalised over real tokens)" if padded else "",
        stage.path,
    )
    return man
