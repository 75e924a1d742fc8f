"""Cost model of a fusion run: tokens, disk, peak memory and time per stage.

No weights are read. Parameters are counted exactly by building the model from its config
on PyTorch's ``meta`` device (shapes only, no memory), so tied embeddings, GQA, MoE and
vocabulary padding are all counted as the real model has them.

Assumptions (also returned in ``ASSUMPTIONS`` and printed under the cost table):

- dtype ``auto`` means bfloat16 where the stage runs on a GPU and float32 on a CPU. The
  device is the model's ``device`` setting; ``auto`` counts as GPU when CUDA is visible
  here or a GPU throughput was passed (``--throughput``).
- capture peak = weights + one layer's activations for one batch + the logits part: on a
  GPU the capture computes logits chunk by chunk from the final hidden states
  (``capture.compute``: a (chunk, V) float32 block and its exp buffer), on a CPU it holds
  one batch of full-vocabulary logits.
- training peak = 16 bytes per parameter (float32 master weights, gradients and AdamW's
  two moments: what ``transformers.Trainer`` keeps under bf16 mixed precision and under
  float32) + logits and the sparse loss's one gradient buffer, both (B, T, V) in the
  training precision (``train.losses``: no dense teacher, no log-softmax copy) +
  activations of 34 bytes x tokens x hidden x layers at 16 bits (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", without the attention
  score term that SDPA/flash attention never stores), doubled in float32. Without
  gradient checkpointing, one device, no sharding.
- disk: capture bytes per position come from encoding a synthetic block with the real
  storage codec (``capture.storage``): the sample's real token ids and offsets, the gold
  token as top-1 and uniformly random ids for the other ranks. Random ids do not
  compress, so this is an upper bound; ``--measure`` encodes the real top-k instead. The
  align stage stores the same codec for the target positions that have a teacher
  prediction only (``align/store.py``, format not final, issue #4): one copy per teacher
  of target tokens x coverage x the codec's bytes per position for target ids.
- time with ``--throughput X``: X is the forward (capture) throughput of the *target* in
  tokens per second on your GPU; other models are scaled by parameter count (forward
  FLOPs are about 2 x parameters per token) and training costs 3 x a forward (6N vs 2N
  FLOPs per token).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fuselm.config import ModelConfig, PipelineConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAIN_STATE_BYTES_PER_PARAM = 16
ACTIVATION_BYTES_16BIT = 34  # per token x hidden x layer (Korthikanti et al. 2022)
TRAIN_OVER_FORWARD = 3.0
SYNTHETIC_POSITIONS = 16384

ASSUMPTIONS = [
    "dtype auto = bfloat16 on a GPU, float32 on a CPU; device auto = GPU when CUDA is "
    "visible or --throughput is given",
    "capture memory = weights + one layer's activations for one batch + logits (GPU: "
    "chunked from hidden states; CPU: one full batch of logits)",
    f"training memory = {TRAIN_STATE_BYTES_PER_PARAM} B/parameter (fp32 weights, grads, "
    "AdamW m and v) + (B,T,V) logits and their gradient + activations "
    f"{ACTIVATION_BYTES_16BIT}·tokens·hidden·layers bytes at 16 bit (x2 in fp32), no "
    "gradient checkpointing, one device",
    "capture disk per position: real storage codec on a synthetic block (random top-k ids: "
    "an upper bound) unless --measure; align output: the same codec per target position "
    "with a teacher prediction (tokens x coverage), one copy per teacher (format not "
    "final, issue #4)",
    "--throughput = the target's forward tokens/s on your GPU; other models scaled by "
    "parameter count; training = 3 x forward",
]


@dataclass
class ModelFacts:
    """What the cost model needs to know about one model (no weights loaded)."""

    name: str
    roles: list[str]
    model_type: str
    parameters: int
    parameters_exact: bool
    embedding_rows: int
    tokenizer_ids: int
    hidden: int
    layers: int
    intermediate: int
    context: int | None
    tied_embeddings: bool

    @property
    def padded(self) -> bool:
        """More embedding rows than token ids (Qwen-style padding)."""
        return self.embedding_rows > self.tokenizer_ids

    @property
    def short(self) -> bool:
        """Fewer embedding rows than token ids: some ids have no embedding (broken pair)."""
        return 0 < self.embedding_rows < self.tokenizer_ids

    def asdict(self) -> dict[str, Any]:
        """JSON-ready, with the derived flags."""
        return {**asdict(self), "padded_vocab": self.padded, "vocab_short": self.short}


def _first_int(cfg: Any, names: tuple[str, ...], default: int = 0) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def count_parameters(config: Any, trust_remote_code: bool = False) -> tuple[int, bool]:
    """Exact parameter count from a config, building the model on the ``meta`` device.

    Returns:
        ``(count, exact)``; ``exact`` is False when the model cannot be built from its
        config and the count is the usual dense-transformer approximation.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return int(sum(p.numel() for p in model.parameters())), True
    except Exception:  # unknown architecture, remote code not allowed, ...
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        h = _first_int(text, ("hidden_size", "n_embd", "d_model"))
        n_layers = _first_int(text, ("num_hidden_layers", "n_layer", "num_layers"))
        inter = _first_int(text, ("intermediate_size", "n_inner", "ffn_dim"), 4 * h)
        v = _first_int(text, ("vocab_size",))
        tied = bool(getattr(text, "tie_word_embeddings", False))
        return int(n_layers * (4 * h * h + 3 * h * inter) + v * h * (1 if tied else 2)), False


def model_facts(m: ModelConfig, config: Any, tokenizer_ids: int, roles: list[str]) -> ModelFacts:
    """Collect the facts of one model from its config (see ``ModelFacts``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first_int(text, ("hidden_size", "n_embd", "d_model"))
    params, exact = count_parameters(config, m.trust_remote_code)
    context = m.max_context or _first_int(
        text, ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    )
    return ModelFacts(
        name=m.resolved_name(),
        roles=roles,
        model_type=str(getattr(config, "model_type", "")),
        parameters=params,
        parameters_exact=exact,
        embedding_rows=_first_int(text, ("vocab_size",)),
        tokenizer_ids=tokenizer_ids,
        hidden=hidden,
        layers=_first_int(text, ("num_hidden_layers", "n_layer", "num_layers")),
        intermediate=_first_int(text, ("intermediate_size", "n_inner", "ffn_dim"), 4 * hidden),
        context=context or None,
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


# --------------------------------------------------------------------------- device, dtype


def on_gpu(device: str, gpu_hint: bool) -> bool:
    """Whether a stage with this ``device`` setting is costed as running on a GPU."""
    if device.startswith("cuda"):
        return True
    if device in ("cpu", "mps"):
        return False
    if gpu_hint:
        return True
    import torch

    return bool(torch.cuda.is_available())


def capture_dtype(m: ModelConfig, gpu: bool) -> str:
    """The capture dtype name under the ``auto`` rule."""
    if m.dtype != "auto":
        return m.dtype
    return "bfloat16" if gpu else "float32"


def train_dtype(precision: str, gpu: bool) -> str:
    """The training compute precision under the ``auto`` rule."""
    if precision != "auto":
        return precision
    return "bfloat16" if gpu else "float32"


# --------------------------------------------------------------------------- memory


def capture_memory(f: ModelFacts, dtype: str, batch_tokens: int, gpu: bool) -> dict[str, int]:
    """Peak memory of capturing one model (bytes), by part (see module docstring)."""
    from fuselm.capture.compute import CHUNK_ELEMENTS, CHUNK_ELEMENTS_ACCEL

    b = DTYPE_BYTES[dtype]
    weights = f.parameters * b
    # One decoder layer's transient tensors per token: residual, q/k/v/o (~5 H) and the
    # MLP's gate/up/down intermediates (~3 I). Earlier layers' are freed (no KV cache).
    activations = batch_tokens * (5 * f.hidden + 3 * f.intermediate) * b
    if gpu:
        logits = batch_tokens * f.hidden * b + 2 * CHUNK_ELEMENTS_ACCEL * 4
    else:
        logits = batch_tokens * f.embedding_rows * b + 2 * CHUNK_ELEMENTS * 4
    return {
        "weights": weights,
        "activations": activations,
        "logits": logits,
        "total": weights + activations + logits,
    }


def train_memory(f: ModelFacts, batch_size: int, seq_len: int, dtype: str) -> dict[str, int]:
    """Peak memory of training the target (bytes), by part (see module docstring)."""
    b = DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    states = f.parameters * TRAIN_STATE_BYTES_PER_PARAM
    logits = 2 * tokens * f.embedding_rows * b
    activations = int(ACTIVATION_BYTES_16BIT * tokens * f.hidden * f.layers * b / 2)
    return {
        "weights_grads_optimizer": states,
        "logits": logits,
        "activations": activations,
        "total": states + logits + activations,
    }


# --------------------------------------------------------------------------- disk


def synthetic_bytes_per_position(
    blocks: list[tuple[np.ndarray, np.ndarray]], vocab_size: int, k: int, seed: int = 0
) -> float:
    """Bytes per stored position of the capture format on a synthetic capture.

    Args:
        blocks: ``(token_ids (T,), offsets (T, 2))`` per block: real tokenizations.
        vocab_size: id range of the top-k ids (random ids are drawn from it).
        k: top-k entries per position.
        seed: for the random parts.

    Returns:
        Parquet bytes (zstd, the stage's options) / positions, over up to
        ``SYNTHETIC_POSITIONS`` positions (blocks are reused if the sample is short).
    """
    from fuselm.capture import storage

    rng = np.random.default_rng(seed)
    rows = []
    positions = 0
    usable = [(ids, off) for ids, off in blocks if len(ids) >= 2]
    if not usable:
        return float("nan")
    i = 0
    while positions < SYNTHETIC_POSITIONS:
        ids, off = usable[i % len(usable)]
        i += 1
        p = len(ids) - 1
        top = rng.integers(0, vocab_size, size=(p, k))
        top[:, 0] = ids[1:]
        # Top-1 log-probability ~ -Exp(1) nats; each next rank a further ~Exp(0.6) lower.
        lp = -np.cumsum(
            np.concatenate([rng.exponential(1.0, (p, 1)), rng.exponential(0.6, (p, k - 1))], 1),
            axis=1,
        )
        rows.append(
            storage.encode_block(
                block_id=f"synthetic#{i}",
                block_hash=f"{i:064x}",
                token_ids=ids,
                offsets=off,
                ids=top,
                logprobs=lp,
                gold=lp[:, 0],
                tail_logmass=np.log(rng.uniform(0.02, 0.6, p)),
                text_roundtrip=True,
            )
        )
        positions += p
    return parquet_bytes(rows, k) / positions


def parquet_bytes(rows: list[dict[str, Any]], k: int) -> int:
    """Size of capture rows written as one shard with the stage's Parquet options."""
    import pyarrow.parquet as pq

    from fuselm.capture import storage

    buf = io.BytesIO()
    pq.write_table(storage.to_table(rows, k), buf, **storage.parquet_options())
    return buf.tell()


def text_compression_ratio(texts: list[str]) -> float:
    """Parquet (zstd) bytes / UTF-8 bytes of the sample texts, as prepare stores them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = sum(len(t.encode("utf-8")) for t in texts)
    if not raw:
        return 1.0
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, compression="zstd")
    return buf.tell() / raw


# --------------------------------------------------------------------------- tokens, time


def train_tokens(cfg: PipelineConfig, target_tokens: float) -> float:
    """Target tokens the training stage processes (epochs, validation hold-out, max_steps)."""
    t = cfg.train
    tokens = target_tokens * (1.0 - cfg.corpus.validation_fraction) * t.epochs
    if t.max_steps:
        tokens = min(tokens, float(t.max_steps * t.batch_size * t.grad_accum * t.seq_len))
    return tokens


def seconds(tokens: float | None, rate: float | None) -> float | None:
    """``tokens / rate`` or None when either is unknown."""
    if tokens is None or not rate or math.isnan(tokens):
        return None
    return tokens / rate


def throughput_rates(
    facts: dict[str, ModelFacts], target: str, throughput: float
) -> dict[str, dict[str, float]]:
    """Forward and training tokens/s per model from the target's GPU forward throughput."""
    ref = facts[target].parameters or 1
    out = {}
    for name, f in facts.items():
        fwd = throughput * ref / max(1, f.parameters)
        out[name] = {"forward": fwd, "train": fwd / TRAIN_OVER_FORWARD}
    return out
