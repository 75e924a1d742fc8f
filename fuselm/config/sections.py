"""The configuration sections: one dataclass per stage, plus :class:`PipelineConfig`.

Why a module of its own: this is the *what* of a run's configuration, readable top to
bottom next to SPEC.md. Each field carries its default (the FuseLLM paper's setting unless
noted) and its documentation (the ``help`` metadata that feeds ``configs/reference.yaml``),
and each section checks its own values in ``__post_init__``. Turning YAML and overrides
into these objects lives in :mod:`fuselm.config.loading`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message says what to change."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _invalid(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}: invalid value {value!r}; {allowed}")


# --------------------------------------------------------------------------- sections


@dataclass
class CorpusInput:
    """One corpus input: a local file/folder or a Hugging Face dataset, with a domain label."""

    path: str = _f("", "Local .txt/.jsonl/.parquet file, or a folder read recursively.")
    hf_dataset: str = _f("", "Hugging Face dataset name (instead of path); needs the hub.")
    hf_config: str = _f("", "Dataset configuration name for hf_dataset (optional).")
    hf_split: str = _f("train", "Split of hf_dataset to read.")
    hf_data_files: list[str] = _f(
        [],
        "Local files (globs allowed) for a builder hf_dataset (parquet, json, text), e.g. "
        "hf_dataset: parquet, hf_data_files: [shards/*.parquet]; read streaming, offline.",
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = _f(
        "auto", "File format; auto = by extension (.jsonl/.json, .parquet, anything else text)."
    )
    glob: str = _f("**/*", "For folders: which files to read (each file is one document).")
    domain: str = _f("", "Domain label for every document of this input (default: 'default').")
    text_field: str = _f("text", "jsonl/parquet/dataset field holding the document text.")
    domain_field: str = _f(
        "domain", "jsonl/parquet field with a per-document domain (overrides `domain`)."
    )
    max_documents: int = _f(0, "Read at most this many documents from this input (0 = all).")
    messages_field: str = _f(
        "messages",
        "jsonl field holding a conversation ([{role, content}, ...]) for rows without "
        "`text_field`: each model's own chat template is applied, prompts are masked.",
    )

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.hf_dataset):
            raise ConfigError("set exactly one of `path` or `hf_dataset`")
        if self.max_documents < 0:
            raise _invalid("max_documents", self.max_documents, "use 0 (all) or a positive count")


@dataclass
class CorpusConfig:
    """Stage 1 (prepare): where the text comes from and how it is cut into blocks."""

    inputs: list[CorpusInput] = _f([], "Corpus inputs; several may be given, each with a domain.")
    block_tokens: int = _f(
        2048,
        "Max tokens per block under EVERY configured tokenizer (capped by every model's "
        "context, minus the special tokens it adds). Paper: 2048.",
    )
    validation_fraction: float = _f(
        0.01, "Share of documents held out for evaluation (by document, seed-stable)."
    )
    seed: int = _f(0, "Seed of the held-out split (a hash of seed + document id).")
    errors: Literal["strict", "replace"] = _f(
        "strict",
        "Invalid UTF-8: strict = stop with the file and byte offset; replace = U+FFFD.",
    )
    blocks_per_shard: int = _f(2000, "Blocks per Parquet shard of the prepare stage.")

    def __post_init__(self) -> None:
        if self.block_tokens < 8:
            raise _invalid("block_tokens", self.block_tokens, "use at least 8 tokens")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise _invalid(
                "validation_fraction", self.validation_fraction, "use a number in [0, 1)"
            )
        if self.blocks_per_shard < 1:
            raise _invalid("blocks_per_shard", self.blocks_per_shard, "use a positive count")


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """A causal LM (source or target) and how to load it."""

    model: str = _f("", "Hugging Face model name or local path (AutoModelForCausalLM).")
    name: str = _f("", "Short name used for output folders; default: last part of `model`.")
    tokenizer: str = _f("", "Tokenizer name or path if different from `model`.")
    revision: str = _f("", "Hub revision (branch, tag or commit) to pin; empty = default.")
    gguf_file: str = _f("", "GGUF file inside `model` to load (dequantised by transformers).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Weights dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = _f("auto", "Device: auto (CUDA when present), cpu, cuda, cuda:N.")
    bos: Literal["auto", "add", "none"] = _f(
        "auto", "Prepend BOS: auto = the tokenizer's own setting (recorded in manifests)."
    )
    max_context: int = _f(0, "Override the context length (0 = from the model config).")
    trust_remote_code: bool = _f(False, "Allow the model's own Python code (off by default).")
    allow_pickle: bool = _f(False, "Allow pickle (.bin) weights; off: safetensors only.")
    chat_template: str = _f(
        "",
        "Chat data: Jinja chat template (text, or a path to a .jinja file) replacing the "
        "tokenizer's own; needed for tokenizers without one.",
    )

    def __post_init__(self) -> None:
        if self.max_context < 0:
            raise _invalid("max_context", self.max_context, "use 0 (from model) or a length")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise _invalid("device", self.device, "use auto, cpu, mps, cuda or cuda:N")
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise _invalid(
                "name", self.name, "use letters, digits, '.', '_' and '-' (a folder name)"
            )

    @property
    def tokenizer_path(self) -> str:
        """Where the tokenizer loads from."""
        return self.tokenizer or self.model

    def resolved_name(self) -> str:
        """``name`` or a folder-safe name derived from ``model``."""
        if self.name:
            return self.name
        base = Path(self.model.rstrip("/")).name or "model"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


@dataclass
class TargetConfig(ModelConfig):
    """The target LM, continually trained on the fused distributions."""

    as_source: bool = _f(
        True, "Also use the target's own distribution as a source (the paper's source #0)."
    )


@dataclass
class CaptureConfig:
    """Stage 2 (capture): per-source top-k next-token distributions."""

    top_k: int = _f(10, "Teacher entries kept per position. Paper: 10.")
    batch_tokens: int = _f(8192, "Tokens per forward batch (blocks bucketed by length).")
    blocks_per_shard: int = _f(1000, "Blocks per capture shard.")
    mode: Literal["offline", "online"] = _f(
        "offline",
        "offline = capture and align write teacher data to disk once, train reads it; "
        "online = teachers run inside the training loop on each batch (no teacher data on "
        "disk; teacher compute paid again by every training run).",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= 1024:
            raise _invalid("top_k", self.top_k, "use 1..1024")
        if self.batch_tokens < 1 or self.blocks_per_shard < 1:
            raise ConfigError("batch_tokens and blocks_per_shard must be positive")


@dataclass
class AlignConfig:
    """Stage 3 (align): token alignment and vocabulary mapping onto the target."""

    method: Literal["offsets", "mined_dp"] = _f(
        "offsets",
        "Token alignment: offsets = exact from character offsets, O(n+m); mined_dp = the "
        "paper's edit-distance dynamic programming over token strings.",
    )
    vocab: Literal["exact", "mined"] = _f(
        "mined", "Vocabulary mapping: exact (EM) or mined (exact, else min edit distance)."
    )
    fallback: Literal["one_hot_next", "mask"] = _f(
        "one_hot_next",
        "Target positions without a teacher prediction: one-hot of the NEXT gold token, "
        "or masked out of the fusion loss.",
    )


@dataclass
class FuseConfig:
    """Stage 4 (fuse): how aligned source distributions are combined."""

    function: Literal["min_ce", "avg_ce"] = _f(
        "min_ce", "min_ce = the source with the lowest cross-entropy; avg_ce = CE-weighted."
    )
    level: Literal["sequence", "token"] = _f(
        "sequence", "Compare sources per block (paper) or per token position."
    )
    max_k: int = _f(0, "Keep at most this many fused entries per position (0 = all).")
    avg_weighting: Literal["softmax", "inverse"] = _f(
        "softmax", "avg_ce weights: softmax(-CE / avg_temperature) or normalised 1/CE."
    )
    avg_temperature: float = _f(
        0.1,
        "avg_ce softmax temperature in nats per byte: CE differences between sources are "
        "small per byte, so 1.0 would give nearly uniform weights.",
    )
    mode: Literal["multi", "pairwise", "both"] = _f(
        "multi",
        "multi = one fused target from all sources (FuseLLM); pairwise = one fused copy of "
        "the target (the pivot) per source, trained on the pivot + that source, for "
        "`fuselm merge` (FuseChat); both = the pairwise targets and the multi-source one.",
    )
    positions: Literal["all", "one_to_one"] = _f(
        "all",
        "Where a teacher counts: all aligned positions, or one_to_one = only where its next "
        "token covers exactly the target's next token (elsewhere: fallback or other sources).",
    )
    gate: Literal["auto", "none", "teacher_better", "advantage"] = _f(
        "auto",
        "Distil only where it teaches something: teacher_better = positions whose fused "
        "teacher is not better (per-byte CE on the block) than the target itself get the "
        "gold one-hot, i.e. plain CLM; advantage = the teacher's share grows with its "
        "advantage (full at gate_scale); both need target.as_source. auto = teacher_better "
        "when the target is a source, else none. Paper: none.",
    )
    gate_scale: float = _f(
        0.1, "gate: advantage: nats per byte of teacher advantage that earn the full share."
    )

    def __post_init__(self) -> None:
        if self.max_k < 0:
            raise _invalid("max_k", self.max_k, "use 0 (no cap) or a positive count")
        if self.avg_temperature <= 0:
            raise _invalid("avg_temperature", self.avg_temperature, "use a positive number")
        if self.gate_scale <= 0:
            raise _invalid("gate_scale", self.gate_scale, "use a positive number (nats/byte)")


# accelerate's trackers (accelerate.utils.LoggerType), named here so that a typo is an
# error at load time without importing accelerate.
TRACKERS = (
    "tensorboard",
    "wandb",
    "mlflow",
    "comet_ml",
    "aim",
    "clearml",
    "dvclive",
    "swanlab",
    "trackio",
)


@dataclass
class LoraConfig:
    """LoRA adapters (peft) for the target: train low-rank updates instead of every weight."""

    rank: int = _f(0, "LoRA rank; 0 = off (full fine-tuning of every weight).")
    alpha: float = _f(32.0, "LoRA alpha: the update is scaled by alpha / rank.")
    dropout: float = _f(0.05, "Dropout on the LoRA branch.")
    target_modules: list[str] = _f(
        ["all-linear"],
        "Modules that get adapters: module names (q_proj, v_proj, ...) or all-linear (every "
        "linear layer but the output head).",
    )
    save: Literal["merged", "adapter"] = _f(
        "merged",
        "merged = the target with the update folded in (a plain model folder, what eval and "
        "`fuselm merge` read); adapter = the adapter only (peft format, loads with the base "
        "model; eval does that).",
    )

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise _invalid("rank", self.rank, "use 0 (off) or a positive rank")
        if self.rank and (self.alpha <= 0 or not 0.0 <= self.dropout < 1.0):
            raise ConfigError("lora.alpha must be > 0 and lora.dropout in [0, 1)")
        if self.rank and not self.target_modules:
            raise _invalid("target_modules", self.target_modules, "name modules or all-linear")


@dataclass
class TrainConfig:
    """Stage 5 (train): continual training of the target."""

    clm_weight: float = _f(
        0.5,
        "λ in L = λ·CLM + (1−λ)·fusion: the CLM term's share of the loss (loss_weighting: "
        "fixed) or of the gradient magnitude (grad_balanced). Paper: 0.9 (configs/paper.yaml); "
        "0.5 won on validation (bench/reproduce/RESULTS-transfer.md).",
    )
    loss_weighting: Literal["fixed", "grad_balanced"] = _f(
        "fixed",
        "fixed = λ as given (paper); grad_balanced = λ set every step so that the CLM term "
        "has the clm_weight share of the gradient magnitude at the logits (tokenkit's "
        "balancing; 0.5 = equal), at the cost of two extra backward passes of the loss.",
    )
    fusion_loss: Literal["ce", "kl"] = _f("ce", "Fusion term: soft cross-entropy or forward KL.")
    temperature: float = _f(
        2.0,
        "Temperature of the fusion term. Paper: 1.0; 2.0 won on validation. With tail_bucket "
        "it tempers the teacher's and the student's k ids + rest alike (the only tempering "
        "the stored top-k defines).",
    )
    temperature_squared: bool = _f(
        True, "Multiply the fusion term by temperature² (Hinton et al.); no effect at 1.0."
    )
    tail_bucket: bool = _f(
        True,
        "Keep the teacher's mass outside its top-k as one extra category (the student then "
        "matches the total tail mass); false = the paper's top-k renormalised to 1, which "
        "teaches overconfidence.",
    )
    learning_rate: float = _f(1e-5, "Peak learning rate. Paper: 1e-5.")
    adam_beta1: float = _f(0.9, "AdamW β1. Paper: 0.9.")
    adam_beta2: float = _f(0.95, "AdamW β2. Paper: 0.95.")
    weight_decay: float = _f(0.1, "AdamW weight decay. Paper: 0.1.")
    warmup_ratio: float = _f(0.01, "Share of steps for linear warm-up. Paper: ~1%.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f(
        "cosine", "LR schedule after warm-up."
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping. Paper: 1.0.")
    epochs: float = _f(1.0, "Passes over the training blocks. Paper: 1.")
    max_steps: int = _f(0, "Stop after this many optimiser steps (0 = by epochs).")
    seq_len: int = _f(2048, "Training sequence length in target tokens. Paper: 2048.")
    batch_size: int = _f(1, "Sequences per device per step.")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Training precision; auto = bf16 on CUDA when supported, else float32."
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in backward: less memory, about a third more compute."
    )
    seed: int = _f(42, "Training seed.")
    save_steps: int = _f(0, "Checkpoint every N steps for resume (0 = at the end only).")
    streaming: bool = _f(
        False,
        "Read the aligned shards a few at a time while training instead of fusing the whole "
        "corpus in memory first (for corpora larger than memory; online mode always streams).",
    )
    shuffle_shards: int = _f(
        4, "Streaming: shards whose rows are shuffled together (memory ~ 2x this many shards)."
    )
    eval_every: int = _f(
        200,
        "Measure held-out bits per byte per domain every N optimiser steps (and before the "
        "first) on train.eval_blocks validation blocks, fused target and control alike; "
        "logged with the step (log.jsonl, trackers, report curves). 0 = off; runs shorter "
        "than N steps measure nothing.",
    )
    eval_blocks: int = _f(
        16, "Validation blocks per measurement (spread over the domains; the same each time)."
    )
    keep_best: bool = _f(
        False,
        "Save the weights of the best held-out measurement as the final model (selection on "
        "validation, i.e. early stopping); the manifest records the step. Needs eval_every.",
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig,
        metadata={"help": "LoRA for the target (and the control, with the same adapter)."},
    )
    report_to: list[str] = _f(
        [],
        "Trackers, through accelerate: tensorboard (writes train/<variant>/tracking/), wandb "
        "(honours WANDB_MODE=offline), mlflow, comet_ml, aim, clearml, dvclive, swanlab, "
        "trackio; none by default. Each needs its own package installed.",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.clm_weight <= 1.0:
            raise _invalid("clm_weight", self.clm_weight, "use λ in [0, 1]")
        for name in ("temperature", "learning_rate", "max_grad_norm", "epochs"):
            if getattr(self, name) <= 0:
                raise _invalid(name, getattr(self, name), "use a positive number")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise _invalid("warmup_ratio", self.warmup_ratio, "use a number in [0, 1)")
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise _invalid(name, getattr(self, name), "use a positive integer")
        if self.max_steps < 0 or self.save_steps < 0:
            raise ConfigError("max_steps and save_steps must be >= 0")
        if self.shuffle_shards < 1:
            raise _invalid("shuffle_shards", self.shuffle_shards, "use a positive count")
        if self.eval_every < 0 or self.eval_blocks < 1:
            raise ConfigError("train.eval_every must be >= 0 and train.eval_blocks >= 1")
        bad = [t for t in self.report_to if t not in TRACKERS]
        if bad:
            raise _invalid("report_to", bad, f"use any of {', '.join(TRACKERS)} (or none: [])")


@dataclass
class EvalConfig:
    """Stage 6 (eval): what is compared and how."""

    control: bool = _f(True, "Also train and evaluate a CLM-only control (λ = 1, same budget).")
    lm_eval_tasks: list[str] = _f([], "lm-evaluation-harness tasks to run (optional extra).")
    lm_eval_include: str = _f(
        "", "Folder of extra lm-eval task YAMLs + local data (paths relative to each YAML)."
    )
    lm_eval_limit: int = _f(0, "Evaluate at most this many documents per lm-eval task (0 = all).")
    lm_eval_batch_size: int = _f(8, "lm-eval batch size.")
    max_blocks: int = _f(0, "Evaluate at most this many held-out blocks (0 = all).")


@dataclass
class MergeConfig:
    """`fuselm merge`: weight merging of same-architecture models (FuseChat's last step)."""

    method: Literal["linear", "task_arithmetic", "ties", "dare", "slerp", "sce"] = _f(
        "sce", "Merge rule (see fuselm.merge.methods for the exact formulas and scaling)."
    )
    models: list[str] = _f(
        [],
        "Local model folders to merge; empty = this run's pairwise targets "
        "(train/pair-*/model, from fuse.mode: pairwise).",
    )
    base: str = _f(
        "",
        "Local folder of the pivot/base model the task vectors are taken from (task_arithmetic,"
        " ties, dare, sce); empty = target.model.",
    )
    weights: list[float] = _f(
        [], "Per-model weights for linear/task_arithmetic/ties/dare (empty = equal)."
    )
    density: float = _f(
        1.0,
        "Share of elements kept: ties trims by magnitude, dare keeps at random, sce selects "
        "by task-vector variance. 1.0 keeps all.",
    )
    scale: float = _f(1.0, "λ multiplying the merged task vector (methods with a base).")
    slerp_t: float = _f(0.5, "slerp: interpolation point between the two models (0 = first).")
    seed: int = _f(0, "dare: seed of the random drop (per tensor and model, order-free).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Saved weights dtype; auto = each tensor's dtype in the base (or first) model."
    )
    max_shard_mb: float = _f(2000.0, "Largest output safetensors shard, in MB.")

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise _invalid("density", self.density, "use a share in (0, 1]")
        if not 0.0 <= self.slerp_t <= 1.0:
            raise _invalid("slerp_t", self.slerp_t, "use a number in [0, 1]")
        if self.max_shard_mb <= 0:
            raise _invalid("max_shard_mb", self.max_shard_mb, "use a positive size in MB")
        if any(w < 0 for w in self.weights):
            raise _invalid("weights", self.weights, "use non-negative weights")
        if self.weights and self.models and len(self.weights) != len(self.models):
            raise ConfigError(
                f"weights: {len(self.weights)} weights for {len(self.models)} models; give "
                "one weight per model (or none for equal weights)"
            )
        if self.weights and self.method in ("slerp", "sce"):
            raise ConfigError(
                f"weights: not used by {self.method} (slerp uses slerp_t, sce derives its own "
                "per-matrix weights); remove merge.weights"
            )


@dataclass
class PipelineConfig:
    """A whole fusion run: one section per stage."""

    run_dir: str = _f("", "Default run directory (the --run-dir option overrides it).")
    corpus: CorpusConfig = _f(None, "Stage 1: corpus inputs and blocking.")
    target: TargetConfig = _f(None, "The target model (trained; also source #0 by default).")
    sources: list[ModelConfig] = _f([], "Source models (any architecture and tokenizer).")
    capture: CaptureConfig = _f(None, "Stage 2: teacher capture.")
    align: AlignConfig = _f(None, "Stage 3: alignment onto the target.")
    fuse: FuseConfig = _f(None, "Stage 4: fusion of the aligned sources.")
    train: TrainConfig = _f(None, "Stage 5: continual training.")
    eval: EvalConfig = _f(None, "Stage 6: evaluation.")
    merge: MergeConfig = _f(None, "`fuselm merge`: weight merging (FuseChat fuse-then-merge).")

    def __post_init__(self) -> None:
        # Sections default to their own defaults (a dataclass default cannot be mutable).
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, _hints(type(self))[f.name]())
        names = [s.resolved_name() for s in self.sources]
        if self.target_is_source():
            names.append(self.target.resolved_name())
        if self.fuse.gate not in ("none", "auto") and not self.target_is_source():
            raise ConfigError(
                f"fuse.gate: {self.fuse.gate} compares each teacher with the target's own "
                "cross-entropy on the block, which needs the target captured as a source; "
                "set target.as_source: true, or fuse.gate: none"
            )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(
                f"sources: duplicate model names {dup}; give each source a distinct `name`"
            )

    def target_is_source(self) -> bool:
        """Whether the target's own distribution is captured as a source (#0)."""
        return bool(self.target.model and self.target.as_source)

    def fusion_gate(self) -> str:
        """``fuse.gate`` resolved: ``auto`` is teacher_better when the target is a source."""
        if self.fuse.gate == "auto":
            return "teacher_better" if self.target_is_source() else "none"
        return self.fuse.gate

    def models(self) -> list[ModelConfig]:
        """Target first (when configured), then the sources: every model of the run."""
        return ([self.target] if self.target.model else []) + list(self.sources)

    def teachers(self) -> list[ModelConfig]:
        """The models whose distributions are captured (target too when ``as_source``)."""
        own = [self.target] if self.target_is_source() else []
        return own + list(self.sources)


SECTIONS = (
    "corpus",
    "target",
    "sources",
    "capture",
    "align",
    "fuse",
    "train",
    "eval",
    "merge",
)


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)
