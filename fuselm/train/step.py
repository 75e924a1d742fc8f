"""What one optimiser step is: settings, schedule, optimizer, precision and the loss share.

Split from :mod:`fuselm.train.trainer` so that the loop there reads top to bottom; these are
the pieces tests and ``bench/train_bench.py`` use on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from fuselm.artifacts import StageError
from fuselm.train.losses import loss_terms


class TrainingError(StageError):
    """Training cannot continue (non-finite loss, incompatible checkpoint, bad settings)."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs from ``cfg.train`` (see :class:`fuselm.config.TrainConfig`).

    ``lam`` is ``clm_weight``; the control variant uses ``lam = 1``.
    """

    lam: float = 0.9
    fusion_loss: str = "ce"
    temperature: float = 1.0
    tail_bucket: bool = False
    temperature_squared: bool = False
    loss_weighting: str = "fixed"
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.1
    warmup_ratio: float = 0.01
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    precision: str = "auto"
    seed: int = 42
    save_steps: int = 0
    gradient_checkpointing: bool = False
    eval_every: int = 0
    keep_best: bool = False
    report_to: tuple[str, ...] = ()
    lora: Any = None  # a fuselm.config.LoraConfig; None or rank 0 = full fine-tuning

    @property
    def uses_lora(self) -> bool:
        """Whether the target trains LoRA adapters instead of every weight."""
        return self.lora is not None and self.lora.rank > 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise TrainingError(f"train.clm_weight (λ) must be in [0, 1], got {self.lam}")
        if self.loss_weighting not in WEIGHTINGS:
            raise TrainingError(
                f"train.loss_weighting {self.loss_weighting!r}; use one of {', '.join(WEIGHTINGS)}"
            )
        if self.lr_scheduler not in SCHEDULES:
            raise TrainingError(
                f"train.lr_scheduler {self.lr_scheduler!r}; use one of {', '.join(SCHEDULES)}"
            )
        if self.batch_size < 1 or self.grad_accum < 1:
            raise TrainingError("train.batch_size and train.grad_accum must be >= 1")

    @classmethod
    def from_config(cls, train: Any, lam: float | None = None) -> TrainSettings:
        """Build from a :class:`fuselm.config.TrainConfig` (``lam`` overrides λ)."""
        shared = {f.name: getattr(train, f.name) for f in fields(cls) if f.name != "lam"}
        shared["report_to"] = tuple(shared["report_to"])
        return cls(lam=train.clm_weight if lam is None else lam, **shared)

    @property
    def uses_teacher(self) -> bool:
        """Whether batches need teacher tensors (False for the CLM-only control)."""
        return self.lam < 1.0


# --------------------------------------------------------------------------- schedule

SCHEDULES = ("cosine", "linear", "constant")
WEIGHTINGS = ("fixed", "grad_balanced")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for update number ``step`` (0-based).

    Linear warm-up over ``warmup`` updates that reaches the peak at the last of them (the
    first update is not wasted at lr 0), then ``kind`` decay over the remaining updates:
    cosine and linear go from the peak towards 0 without reaching it at the last update.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # [0, 1)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total: int, ratio: float) -> int:
    """Warm-up updates: ``ceil(ratio * total)`` (0 when the ratio is 0)."""
    return math.ceil(ratio * total) if ratio > 0 else 0


def with_lora(model: torch.nn.Module, lora: Any, gradient_checkpointing: bool) -> Any:
    """Wrap the target in peft LoRA adapters; only they train (``requires_grad``).

    Why peft: its adapters are what users load elsewhere (``PeftModel``, transformers'
    adapter support, ``merge_and_unload``). The control gets the same settings, so the
    comparison stays "same training, with or without fusion".
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise TrainingError(
            "train.lora needs the peft package: pip install 'fuselm[lora]' (or pip install peft)"
        ) from e
    modules = list(lora.target_modules)
    cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if modules == ["all-linear"] else modules,
        task_type="CAUSAL_LM",
    )
    if gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; peft's fix.
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise TrainingError(f"train.lora: {e}") from None


def build_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases and norm scales).

    Decaying a norm's scale towards 0 or a bias towards 0 is not regularisation but
    damage; this is also what ``transformers.Trainer`` does.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=s.learning_rate,
        betas=(s.adam_beta1, s.adam_beta2),
    )


def cpu_only() -> bool:
    """Whether this machine has no accelerator (then accelerate must be told so).

    accelerate only treats a ``torchrun`` launch on a machine without GPUs as
    multi-process (MULTI_CPU, gloo) when it is created with ``cpu=True``; otherwise every
    process silently trains alone. Pass the result to ``PartialState`` / ``Accelerator``.
    """
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return not acc.is_available()
    return not torch.cuda.is_available()


def mixed_precision(precision: str) -> str:
    """``train.precision`` -> accelerate's ``mixed_precision`` (``no`` / ``bf16`` / ``fp16``).

    Weights and optimizer state stay float32 in every mode (AdamW updates at lr 1e-5 vanish
    in bfloat16 weights); the precision only selects autocast for the compute.
    """
    if precision == "auto":
        cuda = torch.cuda.is_available()
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "float16" and not torch.cuda.is_available():
        raise TrainingError("train.precision: float16 needs a CUDA GPU; use bfloat16 or float32")
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[precision]


# --------------------------------------------------------------------------- loss


# Per-step sums a fusion micro-batch adds to the train log (``micro_batch_loss``), in order.
STEP_SUMS = (
    "clm",  # sum of CLM NLLs
    "fusion",  # sum of fusion terms
    "lam",  # sum over micro-batches of the CLM weight used (x their CLM positions)
    "gold_inside",
    "teacher_gold_nll",
    "student_gold_nll",
    "gold_outside",
    "tail_mass",
)


def micro_batch_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    s: TrainSettings,
    clm_total: float,
    fusion_total: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one micro-batch as its share of the step's token-weighted objective.

    The step objective is ``lam · (sum of CLM NLLs) / clm_total + (1 - lam) · (sum of
    fusion terms) / fusion_total`` over the whole global batch (all micro-batches, all
    processes). For this micro-batch with ``n_c`` / ``n_f`` positions, the share is
    ``a · clm_mean + b · fusion_mean`` with ``a = lam · n_c / clm_total`` and ``b = (1 -
    lam) · n_f / fusion_total``.

    ``lam`` is ``clm_weight`` with ``loss_weighting: fixed``. With ``grad_balanced`` it is
    set per micro-batch so that ``clm_weight`` is the CLM term's share of the gradient
    *magnitude* (as tokenkit balances its losses; 0.5 = equal contributions): with ``g_c``,
    ``g_f`` the norms of the two mean terms' gradients with respect to the logits (the
    last layer's output, where both terms enter),
    ``lam = (w / g_c) / (w / g_c + (1 - w) / g_f)`` for ``w = clm_weight``. It costs two
    more vocabulary-wide backward passes of the loss (not of the model).

    The model is called without labels: its own loss would materialise another
    ``(B, T, V)`` tensor.

    Args:
        model: the (possibly wrapped) causal LM.
        batch: output of :func:`fuselm.train.batching.collate`, on the model's device.
        s: the settings (λ, weighting, fusion kind, temperature, tail bucket).
        clm_total: CLM positions of the whole step (all processes).
        fusion_total: fusion positions of the whole step (all processes).

    Returns:
        ``(loss, sums)``: the share to back-propagate (not yet multiplied by processes x
        accumulation steps), and the detached ``STEP_SUMS`` of this micro-batch (float32,
        on the logits' device) for the log.
    """
    out = model(input_ids=batch["input_ids"], use_cache=False)
    logits = out.logits  # (B, L, V)
    n_c = float(batch["clm_tokens"])
    n_f = float(batch["fusion_tokens"]) if s.uses_teacher else 0.0
    if n_c == 0.0:  # nothing to learn here; keep the graph so DDP's hooks still fire
        return logits.sum() * 0.0, logits.new_zeros(len(STEP_SUMS), dtype=torch.float32)
    use = s.uses_teacher and n_f > 0
    terms = loss_terms(
        logits,
        batch["labels"],
        batch.get("teacher_ids") if use else None,
        batch.get("teacher_logprobs") if use else None,
        kind=s.fusion_loss,  # type: ignore[arg-type]
        temperature=s.temperature,
        tail_bucket=s.tail_bucket,
        teacher_tail_logmass=batch.get("teacher_tail_logmass") if use else None,
        temperature_squared=s.temperature_squared,
    )
    lam = s.lam
    if use and s.loss_weighting == "grad_balanced":
        lam = _balanced_lam(logits, terms, s.lam)
    a = lam * n_c / clm_total if clm_total > 0 else 0.0
    b = (1.0 - lam) * n_f / fusion_total if use and fusion_total > 0 else 0.0
    loss = a * terms.clm + b * terms.fusion if use else a * terms.clm
    # Detached sums for the log, left on the device: reading them here would sync.
    zero = logits.new_zeros((), dtype=torch.float32)
    values = [terms.clm.detach() * n_c, terms.fusion.detach() * n_f, zero + lam * n_c]
    values += [terms.diagnostics.get(k, zero) for k in STEP_SUMS[3:]]
    return loss, torch.stack([v.to(torch.float32) for v in values])


def _balanced_lam(logits: torch.Tensor, terms: Any, share: float) -> float:
    """λ giving the CLM term ``share`` of the gradient magnitude at the logits.

    Both norms are of the *mean* terms' gradients with respect to the logits; each
    ``autograd.grad`` runs the loss's own backward (one transient ``(B, T, V)`` buffer),
    never the model's.
    """
    if share in (0.0, 1.0):
        return share
    (g_c,) = torch.autograd.grad(terms.clm, logits, retain_graph=True)
    n_c = float(g_c.float().norm())
    del g_c
    (g_f,) = torch.autograd.grad(terms.fusion, logits, retain_graph=True)
    n_f = float(g_f.float().norm())
    del g_f
    if n_c == 0.0 or n_f == 0.0:  # one term has nothing to say: the other takes all
        return 1.0 if n_f == 0.0 else 0.0
    w_c, w_f = share / n_c, (1.0 - share) / n_f
    return w_c / (w_c + w_f)
