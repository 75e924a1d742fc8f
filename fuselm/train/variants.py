"""The train stage's variants: their names, teachers and components (the stage identity).

Why a module of its own: which models ``fuselm train`` trains (``fused``, one
``pair-<source>`` per source, ``control``) and what each one's fingerprint depends on are
questions that the stage, ``fuselm status`` and the data loading all ask, and whose
answers decide what is stale; keeping them apart from the training loop's orchestration
(:mod:`fuselm.train.stage`) makes the staleness rules readable in one place. Checking the
inputs those components name (finished alignments, the target's vocabulary) happens here
on the way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fuselm.artifacts import Stage, StageError
from fuselm.config import PipelineConfig, to_dict

FORMAT_VERSION = 1
VARIANTS = ("fused", "control")
PAIR_PREFIX = "pair-"  # pairwise targets (fuse.mode: pairwise): train/pair-<source>
# Train settings that only shape the fusion term: the control's identity leaves them out,
# so that changing them does not make the control stale.
_FUSION_ONLY = (
    "clm_weight",
    "loss_weighting",
    "fusion_loss",
    "temperature",
    "temperature_squared",
    "tail_bucket",
)


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
            for another target vocabulary.
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


def variant_components(cfg: PipelineConfig, variant: str, base: dict[str, Any]) -> dict[str, Any]:
    """Everything a variant's model depends on (its fingerprint is the stage identity).

    Left out on purpose: the number of processes and the device (they change speed and
    floating-point noise, not the objective: every step is the token-weighted mean over
    the same global batch, see :mod:`fuselm.train.trainer`), and ``save_steps``.
    """
    # Left out: where checkpoints and trackers write (they change no weight).
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("save_steps", "report_to")}
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


# --------------------------------------------------------------------------- helpers


def _align_manifest(run_dir: Path, name: str) -> dict[str, Any]:
    from fuselm.align.store import FORMAT_VERSION

    man = Stage(run_dir, f"align/{name}").manifest()
    if man is None:
        raise StageError(
            f"train: {run_dir / 'align' / name} is not finished; run `fuselm align` first"
        )
    found = man.get("components", {}).get("format")
    if found != FORMAT_VERSION:
        raise StageError(
            f"train: {run_dir / 'align' / name} was written in align format {found}, without "
            "the teacher's tail mass that the fused target keeps (format "
            f"{FORMAT_VERSION}); re-run `fuselm align --force` (captures are reused)"
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
