"""Stage 5, train: continual training of the target, fused variant and CLM-only control.

Reading top to bottom: ``run_train`` checks that every teacher's alignment is finished
and was made for this target's vocabulary, then trains each variant with
``train_variant``: ``fused`` (``λ = train.clm_weight``) into ``<run_dir>/train/fused`` and,
when ``eval.control`` is on, ``control`` (``λ = 1``: the same blocks, rows, order, steps
and seed, no teacher) into ``<run_dir>/train/control``. A variant is one
:class:`~fuselm.artifacts.Stage`: a finished one whose inputs did not change is skipped,
a changed one is refused as stale (``--force`` redoes it), an interrupted one resumes
from its last checkpoint.

Scale-out: every process of a ``torchrun`` / ``accelerate launch`` runs this; rank 0
alone decides skip / resume / restart and writes the manifest, and the trainer splits
every global batch across the processes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from fuselm.artifacts import Stage, StageError, fingerprint
from fuselm.config import PipelineConfig, to_dict
from fuselm.train.data import (
    FusionSpec,
    TrainDataError,
    build_examples,
    join_sources,
)
from fuselm.train.online import OnlineTeachers
from fuselm.train.step import TrainSettings, cpu_only
from fuselm.train.stream import AlignedShards, StreamingExamples, merge_fusion_stats
from fuselm.train.trainer import CHECKPOINTS, LOG_FILE, MODEL_DIR, Trainer

log = logging.getLogger("fuselm.train")

FORMAT_VERSION = 1
VARIANTS = ("fused", "control")
PAIR_PREFIX = "pair-"  # pairwise targets (fuse.mode: pairwise): train/pair-<source>
# Train settings that only shape the fusion term: the control's identity leaves them out,
# so that changing them does not make the control stale.
_FUSION_ONLY = ("clm_weight", "fusion_loss", "temperature", "tail_bucket")


def run_train(cfg: PipelineConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Train the fused target (and the CLM-only control) into ``<run_dir>/train/<variant>/``.

    Returns:
        ``{"stage": "train", "stats": {variant: stats}, "variants": {variant: manifest}}``.
    """
    from accelerate import PartialState

    run_dir = Path(run_dir)
    teachers = [m.resolved_name() for m in cfg.teachers()]
    base = base_components(cfg, run_dir)
    variants = variant_names(cfg)
    state = PartialState(cpu=cpu_only())  # joins the process group of torchrun / accelerate
    data: dict[str, Any] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for variant in variants:
        components = variant_components(cfg, variant, base)
        stage = Stage(run_dir, f"train/{variant}")
        decision: dict[str, Any] = {}
        if state.is_main_process:
            try:
                decision = {"state": _begin(stage, cfg, variant, components, force)}
            except StageError as e:
                decision = {"state": "error", "message": str(e)}
        decision = _broadcast(state, decision)
        if decision["state"] == "error":
            raise StageError(decision["message"])
        if decision["state"] == "skip":
            log.info("train %s: up to date in %s (skipped)", variant, stage.path)
            manifests[variant] = stage.manifest() or {}
            continue
        if not data:
            data = _load_data(cfg, run_dir, teachers, variants)
        manifests[variant] = train_variant(
            cfg,
            run_dir,
            variant,
            stage,
            components,
            data[variant],
            variant_teachers(cfg, variant),
            state,
        )
    return {
        "stage": "train",
        "stats": {v: man.get("stats", {}) for v, man in manifests.items()},
        "variants": manifests,
    }


def variant_names(cfg: PipelineConfig) -> list[str]:
    """The variants ``fuselm train`` trains under this config, in order.

    ``fuse.mode``: ``multi`` = ``fused`` (all teachers at once, FuseLLM); ``pairwise`` = one
    ``pair-<source>`` per source (the pivot target + that source, FuseChat), to be merged
    by ``fuselm merge``; ``both`` = all of them. ``control`` when ``eval.control``.
    """
    out = []
    if cfg.fuse.mode in ("multi", "both"):
        out.append("fused")
    if cfg.fuse.mode in ("pairwise", "both"):
        out += [f"{PAIR_PREFIX}{m.resolved_name()}" for m in cfg.sources]
    return out + (["control"] if cfg.eval.control else [])


def variant_teachers(cfg: PipelineConfig, variant: str) -> list[str]:
    """The teachers a variant fuses: all for ``fused``, pivot + one source for a pair."""
    names = [m.resolved_name() for m in cfg.teachers()]
    if not variant.startswith(PAIR_PREFIX):
        return names
    source = variant[len(PAIR_PREFIX) :]
    if source not in [m.resolved_name() for m in cfg.sources]:
        raise StageError(
            f"train: variant {variant} names no configured source '{source}' "
            f"(sources: {', '.join(m.resolved_name() for m in cfg.sources) or 'none'})"
        )
    own = [cfg.target.resolved_name()] if cfg.target.as_source else []
    return own + [source]


def base_components(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """What both variants depend on; checks the inputs on the way.

    Raises:
        StageError: no target or teachers, an unfinished alignment, an alignment made
            for another target vocabulary, or an unsupported ``fuse.ce_unit``.
    """
    from fuselm.models import model_identity, tokenizer_identity

    if not cfg.target.model:
        raise StageError("train: no target configured; set target.model")
    teachers = [m.resolved_name() for m in cfg.teachers()]
    if not teachers:
        raise StageError(
            "train: no teachers: set sources (and/or target.as_source); fusion needs at least "
            "one aligned source"
        )
    if cfg.fuse.mode != "multi" and not cfg.sources:
        raise StageError(
            f"train: fuse.mode: {cfg.fuse.mode} trains one copy of the target per source, "
            "but no sources are configured; add sources or use fuse.mode: multi"
        )
    if cfg.fuse.ce_unit != "byte":
        raise StageError(
            "fuse.ce_unit: the align records count the text each prediction covers in bytes "
            "only; use fuse.ce_unit: byte"
        )
    tok_digest = tokenizer_identity(cfg.target)
    if cfg.capture.mode == "online":  # no capture/align artifacts: the teachers themselves
        from fuselm.train.online import online_components

        prep = Stage(run_dir, "prepare").manifest()
        if prep is None:
            raise StageError(f"train: {run_dir}/prepare is not finished; run `fuselm prepare`")
        return {
            "format": FORMAT_VERSION,
            **online_components(cfg, prep["fingerprint"]),
            "target": model_identity(cfg.target),
            "target_tokenizer": tok_digest,
        }
    align_mans = {name: _align_manifest(run_dir, name) for name in teachers}
    _check_target_vocab(cfg, run_dir, align_mans, tok_digest)
    prep = Stage(run_dir, "prepare").manifest() or {}
    return {
        "format": FORMAT_VERSION,
        "prepare": prep.get("fingerprint"),
        "align": {n: man["fingerprint"] for n, man in align_mans.items()},
        "target": model_identity(cfg.target),
        "target_tokenizer": tok_digest,
    }


def current_components(cfg: PipelineConfig, run_dir: Path, variant: str) -> dict[str, Any] | None:
    """A variant's components under the current config (for ``fuselm status``), or None.

    None when they cannot be computed (alignment unfinished, bad input): the status then
    shows the stage's own state without a staleness check.
    """
    try:
        return variant_components(cfg, variant, base_components(cfg, Path(run_dir)))
    except StageError:
        return None


def variant_components(cfg: PipelineConfig, variant: str, base: dict[str, Any]) -> dict[str, Any]:
    """Everything a variant's model depends on (its fingerprint is the stage identity).

    Left out on purpose: the number of processes and the device (they change speed and
    floating-point noise, not the objective: every step is the token-weighted mean over
    the same global batch, see :mod:`fuselm.train.trainer`), and ``save_steps``.
    """
    train = {k: v for k, v in to_dict(cfg.train).items() if k != "save_steps"}
    if variant == "control":
        # The control's rows are the blocks' target token ids: they follow from the
        # prepared blocks and the target's tokenizer and BOS policy, never from a teacher,
        # so a changed source or alignment setting must not make the control stale.
        train = {k: v for k, v in train.items() if k not in _FUSION_ONLY}
        own = {k: v for k, v in base.items() if k != "align"}
        return {
            **own,
            "target_bos": cfg.target.bos,
            "variant": variant,
            "train": train,
            "clm_weight": 1.0,
        }
    teachers = variant_teachers(cfg, variant)
    fuse = {k: v for k, v in to_dict(cfg.fuse).items() if k != "mode"}  # mode: which variants
    # A pair depends on its own teachers' alignments only: re-aligning another source
    # leaves it up to date.
    align = {n: fp for n, fp in base["align"].items() if n in teachers}
    return {
        **base,
        "align": align,
        "variant": variant,
        "train": train,
        "fuse": fuse,
        "fallback": cfg.align.fallback,
        "teachers": teachers,
    }


def train_variant(
    cfg: PipelineConfig,
    run_dir: Path,
    variant: str,
    stage: Stage,
    components: dict[str, Any],
    data: Any,
    teachers: list[str],
    state: Any,
) -> dict[str, Any]:
    """Train one variant (resuming from its last checkpoint) and write its manifest."""
    import torch

    from fuselm.models import (
        ensure_fast_tokenizer,
        load_causal_lm,
        load_model_config,
        load_tokenizer,
        model_context,
    )

    lam = 1.0 if variant == "control" else cfg.train.clm_weight
    settings = TrainSettings.from_config(cfg.train, lam=lam)
    tokenizer, _ = ensure_fast_tokenizer(cfg.target, load_tokenizer(cfg.target))
    context = model_context(cfg.target)
    streaming = isinstance(data, StreamingExamples)
    rows: Any = data if streaming else data.examples
    longest = data.longest if streaming else max((len(e) for e in data.examples), default=0)
    if context and longest > context:
        raise StageError(
            f"train: rows of {longest} tokens exceed the target's context of {context}; "
            f"lower train.seq_len to at most {context}"
        )
    save_dtype = _checkpoint_dtype(load_model_config(cfg.target))
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    def load(device: torch.device) -> torch.nn.Module:
        # float32 master weights whatever the checkpoint's dtype; train.precision picks
        # the compute precision (autocast).
        model = load_causal_lm(cfg.target, device=device, dtype=torch.float32)
        n_emb = model.get_input_embeddings().weight.shape[0]
        # Streaming: ids come from the target's own tokenizer (digest checked above).
        top = -1 if streaming else max(int(e.input_ids.max()) for e in data.examples)
        if top >= n_emb:
            raise StageError(
                f"train: token id {top} of the aligned data is outside the target's "
                f"{n_emb} embedding rows; the alignment was made for another target"
            )
        return model

    trainer = Trainer(
        load,
        rows,
        settings,
        stage.path,
        fingerprint=fingerprint(components),
        pad_id=pad_id,
        tokenizer=tokenizer,
        model_card=model_card(cfg, variant, lam, teachers, data),
        save_dtype=save_dtype,
        desc=f"train {variant}",
        drop_checkpoints=False,  # removed below, once the manifest is written
    )
    try:
        result = trainer.train()
    except TrainDataError as e:
        raise StageError(f"train {variant}: {e}") from None
    if streaming and data.fusion is not None:  # each process counted the blocks it fused
        data.fusion = _gathered_fusion(state, data, teachers)
    stats = {
        **result.as_dict(),
        **data.stats(),
        "lambda": lam,
        "epochs": round(result.steps * result.global_batch / len(rows), 4),
    }
    if streaming:
        stats["mode"] = cfg.capture.mode
        reader = data.reader
        if isinstance(reader, OnlineTeachers):
            stats["teacher_tokens_this_process"] = reader.forward_tokens
    if variant == "control":
        stats.pop("fusion", None)
    man: dict[str, Any] = {}
    if state.is_main_process:
        man = stage.finish(
            stats,
            {"variant": variant, "model": str(stage.path / MODEL_DIR), "log": LOG_FILE},
            shards=[],
        )
        log.info(
            "train %s: %d steps, %d tokens, final clm %.4f%s -> %s",
            variant,
            result.steps,
            result.tokens,
            result.final_clm or 0.0,
            f", fusion {result.final_fusion:.4f}" if result.final_fusion is not None else "",
            stage.path / MODEL_DIR,
        )
        trainer.remove_checkpoints()
    state.wait_for_everyone()
    return man or stage.manifest() or {}


# --------------------------------------------------------------------------- helpers


def _align_manifest(run_dir: Path, name: str) -> dict[str, Any]:
    man = Stage(run_dir, f"align/{name}").manifest()
    if man is None:
        raise StageError(
            f"train: {run_dir / 'align' / name} is not finished; run `fuselm align` first"
        )
    return man


def _check_target_vocab(
    cfg: PipelineConfig, run_dir: Path, align_mans: dict[str, Any], digest: str
) -> None:
    """Refuse alignments made for another target tokenizer, naming both fingerprints.

    The align manifest identifies the target either by its capture (when the target is
    also a source; that capture records the tokenizer digest) or by the digest itself.
    """
    for name, man in align_mans.items():
        target = man.get("components", {}).get("target")
        aligned = None
        if isinstance(target, dict):
            aligned = target.get("tokenizer")
        elif isinstance(target, str):  # fingerprint of the target's capture
            cap = Stage(run_dir, f"capture/{cfg.target.resolved_name()}").manifest() or {}
            if cap.get("fingerprint") == target:
                aligned = cap.get("components", {}).get("tokenizer")
            else:
                aligned = f"(target capture {target}, no longer in the run dir)"
        if aligned != digest:
            raise StageError(
                f"train: teacher '{name}' was aligned for a target vocabulary with tokenizer "
                f"fingerprint {aligned}, but the configured target "
                f"'{cfg.target.resolved_name()}' has {digest}; re-run `fuselm capture` and "
                "`fuselm align` for this target (with --force)"
            )


def _begin(
    stage: Stage, cfg: PipelineConfig, variant: str, components: dict[str, Any], force: bool
) -> str:
    """Skip / resume / (re)start decision for one variant (rank 0 only)."""
    ckpts = stage.path / CHECKPOINTS
    pend = stage.pending()
    if (
        not force
        and stage.manifest() is None
        and pend is not None
        and pend.get("fingerprint") != fingerprint(components)
        and ckpts.is_dir()
        and any(ckpts.iterdir())
    ):
        raise StageError(
            stage._mismatch(pend.get("components", {}), components).replace(
                "was produced from different inputs",
                "holds checkpoints of an interrupted run with different inputs",
            )
        )
    config = {
        "variant": variant,
        "train": to_dict(cfg.train),
        "fuse": to_dict(cfg.fuse),
        "fallback": cfg.align.fallback,
    }
    resume = (
        not force
        and stage.manifest() is None
        and pend is not None
        and pend.get("fingerprint") == fingerprint(components)
    )
    state = stage.begin(components, config, [], force=force)
    if state == "skip":  # killed after the manifest, before the checkpoints were dropped
        shutil.rmtree(ckpts, ignore_errors=True)
    if state == "run" and not resume:
        # Nothing to resume: drop what an older run left (checkpoints, log, model).
        shutil.rmtree(ckpts, ignore_errors=True)
        shutil.rmtree(stage.path / MODEL_DIR, ignore_errors=True)
        (stage.path / LOG_FILE).unlink(missing_ok=True)
    return state


def _broadcast(state: Any, obj: dict[str, Any]) -> dict[str, Any]:
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _fusion_spec(cfg: PipelineConfig) -> FusionSpec:
    return FusionSpec(
        function=cfg.fuse.function,
        level=cfg.fuse.level,
        fallback=cfg.align.fallback,
        # Not a FuseConfig field yet; picked up as soon as it is added.
        max_k=int(getattr(cfg.fuse, "max_k", 0) or 0),
        avg_weighting=cfg.fuse.avg_weighting,
        avg_temperature=cfg.fuse.avg_temperature,
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


def _checkpoint_dtype(config: Any) -> Any:
    """The dtype the target's checkpoint was stored in (the fused model is saved alike)."""
    import torch

    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in (torch.float16, torch.bfloat16, torch.float32) else None


def model_card(
    cfg: PipelineConfig, variant: str, lam: float, teachers: list[str], data: Any
) -> str:
    """The ``README.md`` saved with the trained model: what it was trained from and how."""
    t = cfg.train
    fusion = data.stats().get("fusion", {})
    lines = [
        f"# {cfg.target.resolved_name()} — fuselm `{variant}`",
        "",
        "Continually trained with fuselm (knowledge fusion of LMs, FuseLLM arXiv 2401.10491) "
        f"on `L = λ·CLM + (1−λ)·fusion` with λ = {lam}"
        + (" (CLM-only control: no teacher)." if lam == 1.0 else "."),
        "",
        f"- base model: `{cfg.target.model}`"
        + (f" @ {cfg.target.revision}" if cfg.target.revision else ""),
    ]
    if variant != "control":
        lines += [
            f"- sources: {', '.join(f'`{n}`' for n in teachers)}"
            + (" (the target is source #0)" if cfg.target.as_source else ""),
            f"- fusion: `{cfg.fuse.function}` at {cfg.fuse.level} level, CE per "
            f"{cfg.fuse.ce_unit}; fallback `{cfg.align.fallback}`; alignment "
            f"`{cfg.align.method}`, vocabulary `{cfg.align.vocab}`",
            f"- teacher top-k: {cfg.capture.top_k} per source (fused rows up to "
            f"{fusion.get('max_fused_width', '?')} entries); fusion loss `{t.fusion_loss}`, "
            f"temperature {t.temperature}, tail bucket {t.tail_bucket}",
            "- source selection share: "
            + (
                "counted while training (train/fused/manifest.json)"
                if data.stats().get("streaming")
                else str(fusion.get("selection_share", {}))
            ),
        ]
    inputs = ", ".join(i.path or i.hf_dataset for i in cfg.corpus.inputs) or "?"
    lines += [
        f"- data: {data.blocks} training blocks ({data.tokens} tokens) from {inputs}",
        f"- optimisation: AdamW lr {t.learning_rate} (β {t.adam_beta1}/{t.adam_beta2}, weight "
        f"decay {t.weight_decay}), {t.lr_scheduler} schedule, warm-up {t.warmup_ratio}, clip "
        f"{t.max_grad_norm}, seq_len {t.seq_len}, batch {t.batch_size} x {t.grad_accum} "
        f"accumulation per process, seed {t.seed}",
        "",
    ]
    return "\n".join(lines)
