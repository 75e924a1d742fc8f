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

The variants' names, teachers and components (what makes one stale) are in
:mod:`fuselm.train.variants`; the rows each variant trains on come from
:mod:`fuselm.train.inputs`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from fuselm.artifacts import Stage, StageError, fingerprint
from fuselm.config import PipelineConfig, to_dict
from fuselm.train.data import (
    TrainDataError,
)
from fuselm.train.inputs import _gathered_fusion, _load_data
from fuselm.train.online import OnlineTeachers
from fuselm.train.step import TrainSettings, cpu_only
from fuselm.train.stream import StreamingExamples
from fuselm.train.trainer import CHECKPOINTS, LOG_FILE, MODEL_DIR, Trainer
from fuselm.train.variants import (
    base_components,
    variant_components,
    variant_names,
    variant_teachers,
)

log = logging.getLogger("fuselm.train")


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


def current_components(cfg: PipelineConfig, run_dir: Path, variant: str) -> dict[str, Any] | None:
    """A variant's components under the current config (for ``fuselm status``), or None.

    None when they cannot be computed (alignment unfinished, bad input): the status then
    shows the stage's own state without a staleness check.
    """
    try:
        return variant_components(cfg, variant, base_components(cfg, Path(run_dir)))
    except StageError:
        return None


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

    heldout = None
    if cfg.train.eval_every > 0:
        from fuselm.train.heldout import HeldOut, heldout_blocks

        blocks = heldout_blocks(run_dir, tokenizer, cfg.target.bos, cfg.train.eval_blocks)
        heldout = HeldOut(blocks, pad_id)
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
        teacher_names=teachers,
        heldout=heldout,
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
    lora = t.lora
    if lora.rank:
        lines.append(
            f"- LoRA (peft): rank {lora.rank}, alpha {lora.alpha}, dropout {lora.dropout}, "
            f"modules {', '.join(lora.target_modules)}; "
            + (
                "this folder holds the ADAPTER only: load it with "
                "`peft.AutoPeftModelForCausalLM.from_pretrained(<this folder>)` (it needs the "
                "base model above)"
                if lora.save == "adapter"
                else "the update is MERGED into these weights (a plain model folder)"
            )
        )
    if variant != "control":
        lines += [
            f"- sources: {', '.join(f'`{n}`' for n in teachers)}"
            + (" (the target is source #0)" if cfg.target.as_source else ""),
            f"- fusion: `{cfg.fuse.function}` at {cfg.fuse.level} level, CE per byte; gate "
            f"`{cfg.fusion_gate()}`, positions `{cfg.fuse.positions}`; fallback "
            f"`{cfg.align.fallback}`; alignment "
            f"`{cfg.align.method}`, vocabulary `{cfg.align.vocab}`",
            f"- teacher top-k: {cfg.capture.top_k} per source (fused rows up to "
            f"{fusion.get('max_fused_width', '?')} entries); fusion loss `{t.fusion_loss}`, "
            f"temperature {t.temperature} (T² scaling {t.temperature_squared}), tail bucket "
            f"{t.tail_bucket}, weighting `{t.loss_weighting}`",
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
