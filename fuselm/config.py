"""Pipeline configuration: one dataclass per stage, loaded from YAML plus ``a.b=c`` overrides.

Every field is documented where it is defined (the ``help`` metadata, which also feeds
``configs/reference.yaml``) and defaults to the FuseLLM paper's setting (arXiv 2401.10491,
SPEC.md section 1) unless noted. Why hand-rolled instead of a config framework: the
errors matter more than the features. A user with a typo'd key or a wrong value gets the
full YAML key, the bad value, what is allowed, and a did-you-mean, before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


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
    ce_unit: Literal["byte", "char"] = _f(
        "byte", "Normalise cross-entropies per byte or per character of text covered."
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

    def __post_init__(self) -> None:
        if self.max_k < 0:
            raise _invalid("max_k", self.max_k, "use 0 (no cap) or a positive count")
        if self.avg_temperature <= 0:
            raise _invalid("avg_temperature", self.avg_temperature, "use a positive number")


@dataclass
class TrainConfig:
    """Stage 5 (train): continual training of the target."""

    clm_weight: float = _f(0.9, "λ in L = λ·CLM + (1−λ)·fusion. Paper: 0.9.")
    fusion_loss: Literal["ce", "kl"] = _f("ce", "Fusion term: soft cross-entropy or forward KL.")
    temperature: float = _f(1.0, "Teacher temperature. Paper: 1.0.")
    tail_bucket: bool = _f(False, "Treat the teacher's mass outside top-k as one extra class.")
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
        if self.tail_bucket and self.temperature != 1.0:
            raise ConfigError(
                "tail_bucket: true needs temperature: 1.0 (the tempered mass of tokens the "
                "teacher did not store cannot be recovered); set one of them back"
            )
        if self.max_steps < 0 or self.save_steps < 0:
            raise ConfigError("max_steps and save_steps must be >= 0")
        if self.shuffle_shards < 1:
            raise _invalid("shuffle_shards", self.shuffle_shards, "use a positive count")


@dataclass
class EvalConfig:
    """Stage 6 (eval): what is compared and how."""

    control: bool = _f(True, "Also train and evaluate a CLM-only control (λ = 1, same budget).")
    unit: Literal["byte", "char"] = _f("byte", "Cross-tokenizer metric: bits per byte or char.")
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
        if self.target.model and self.target.as_source:
            names.append(self.target.resolved_name())
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(
                f"sources: duplicate model names {dup}; give each source a distinct `name`"
            )

    def models(self) -> list[ModelConfig]:
        """Target first (when configured), then the sources: every model of the run."""
        return ([self.target] if self.target.model else []) + list(self.sources)

    def teachers(self) -> list[ModelConfig]:
        """The models whose distributions are captured (target too when ``as_source``)."""
        own = [self.target] if self.target.model and self.target.as_source else []
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


# --------------------------------------------------------------------------- loading


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if origin is Literal:
        allowed = list(get_args(tp))
        if value not in allowed:
            hint = _did_you_mean(str(value), [str(a) for a in allowed])
            raise _invalid(key, value, f"allowed: {', '.join(map(str, allowed))}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _invalid(key, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _invalid(key, value, "expected an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        raise _invalid(key, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _invalid(key, value, "expected a string")
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise _invalid(key, value, "expected a list")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise _invalid(key, value, "expected a mapping of fields")
        return from_dict(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, validating every key and value.

    Args:
        cls: the dataclass to build.
        data: parsed YAML (or override) mapping.
        prefix: the dotted key of ``data`` within the whole YAML, for error messages.

    Raises:
        ConfigError: unknown key (with a did-you-mean), wrong type or invalid value; the
            message names the full YAML key.
    """
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown key '{full}'{_did_you_mean(str(key), names)}; "
                f"valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, full)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and not msg.startswith(prefix):
            msg = f"{prefix}.{msg}" if re.match(r"^\w+:", msg) else f"{prefix}: {msg}"
        raise ConfigError(msg) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration as plain data (what manifests and config.json store)."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.field=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value (e.g. train.lr=2e-5)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return path, value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at ``path`` in the raw config dict.

    List items are addressed by index (``sources.0.dtype``) or by model name
    (``sources.llama.dtype``), so an override survives reordering of the YAML list.
    """
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if part == "sources" else {}
        node = node[part]
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {'.'.join(path)}: '{where}' is not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(items) <= idx < len(items):
            raise ConfigError(f"override {where}: index {idx} out of range ({len(items)} items)")
        return idx
    for i, item in enumerate(items):
        if isinstance(item, dict) and part in (item.get("name"), _basename(item.get("model"))):
            return i
    names = [
        str(it.get("name") or _basename(it.get("model"))) for it in items if isinstance(it, dict)
    ]
    raise ConfigError(f"override {where}: no list item named '{part}' (have: {', '.join(names)})")


def _basename(model: Any) -> str:
    return Path(str(model or "").rstrip("/")).name


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Load a pipeline YAML, apply ``section.field=value`` overrides, and validate.

    Relative local paths in the YAML (corpus inputs, model paths that exist on disk) are
    resolved against the YAML file's folder, so a config works from any working directory.

    Raises:
        ConfigError: the file is missing or not a mapping, or any key/value is invalid.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping with sections {', '.join(SECTIONS)}")
        data = loaded
        base = p.resolve().parent
    for item in overrides:
        keypath, value = parse_override(item)
        apply_override(data, keypath, value)
    _resolve_paths(data, base)
    try:
        return from_dict(PipelineConfig, data)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    if isinstance(data.get("run_dir"), str) and data["run_dir"]:
        data["run_dir"] = str((base / Path(data["run_dir"]).expanduser()).resolve())
    corpus = data.get("corpus")
    if isinstance(corpus, dict) and isinstance(corpus.get("inputs"), list):
        for item in corpus["inputs"]:
            if isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
                item["path"] = str((base / Path(item["path"]).expanduser()).resolve())
            if isinstance(item, dict) and isinstance(item.get("hf_data_files"), list):
                item["hf_data_files"] = [
                    str(base / Path(f).expanduser()) if isinstance(f, str) else f
                    for f in item["hf_data_files"]
                ]
    models = [data.get("target")] + list(data.get("sources") or [])
    for m in models:
        if not isinstance(m, dict):
            continue
        for key in ("model", "tokenizer"):
            v = m.get(key)
            # Only rewrite what exists locally: "org/name" hub ids must stay as they are.
            if isinstance(v, str) and v and (base / v).exists():
                m[key] = str((base / v).resolve())


# --------------------------------------------------------------------------- reference


def reference_yaml() -> str:
    """An annotated YAML with every field, its default and its documentation."""
    out = ["# fuselm pipeline configuration: every field with its default (generated).", ""]

    def emit(cls: type, indent: int, as_list_item: bool = False) -> None:
        hints = _hints(cls)
        first = True
        for fld in dataclasses.fields(cls):
            tp = hints[fld.name]
            pad = " " * indent
            lead = pad
            if as_list_item and first:
                lead = " " * (indent - 2) + "- "
            first = False
            out.append(f"{pad}# {fld.metadata.get('help', '')}")
            if dataclasses.is_dataclass(tp):
                out.append(f"{lead}{fld.name}:")
                emit(tp, indent + 2)
            elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
                out.append(f"{lead}{fld.name}:")
                emit(get_args(tp)[0], indent + 4, as_list_item=True)
            else:
                default = fld.default if fld.default is not dataclasses.MISSING else []
                if fld.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    default = fld.default_factory()  # type: ignore[misc]
                dumped = yaml.safe_dump(default, default_flow_style=True).strip()
                dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
                out.append(f"{lead}{fld.name}: {dumped}")

    emit(PipelineConfig, 0)
    return "\n".join(out) + "\n"
