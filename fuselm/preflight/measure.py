"""``--measure``: a few timed batches with the real weights on this machine.

Capture is measured through the capture stage's own ``Capturer`` (tokenize with offsets,
length-bucketed batches of ``capture.batch_tokens``, forward, chunked top-k, encode), so
the rate is the stage's rate and the encoded rows give the real bytes per position and the
real top-k for the remapped mass. Training is measured with the library's sparse combined
loss (``train.losses.combined_loss``) on the target, with a synthetic teacher top-k (what
the teacher says does not change the cost), AdamW and gradient clipping as configured.

Weights load with ``models.load_causal_lm``: safetensors only unless ``allow_pickle``,
remote code only with ``trust_remote_code``. A model whose estimated memory does not fit
the free memory of its device is not loaded; the report says so.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from fuselm.config import ModelConfig, PipelineConfig

log = logging.getLogger("fuselm.preflight")

CAPTURE_BATCHES = 2  # timed capture batches (of capture.batch_tokens) per model
TRAIN_STEPS = 2  # timed optimiser steps, after one untimed warm-up step
CPU_TRAIN_SEQ_CAP = 512  # measured sequence length cap on a CPU (rate per token)
MEMORY_HEADROOM = 0.85  # use at most this share of the free memory


def free_memory(device: Any) -> int | None:
    """Free memory of a device in bytes (CUDA: mem_get_info; CPU: MemAvailable), or None."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def fits(needed: int, device: Any) -> tuple[bool, str]:
    """Whether ``needed`` bytes fit the device's free memory (with headroom)."""
    free = free_memory(device)
    if free is None:
        return True, ""
    if needed > MEMORY_HEADROOM * free:
        return False, (
            f"needs about {needed / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free"
        )
    return True, ""


def cut_to_tokens(tok: Any, texts: list[str], limit: int) -> list[str]:
    """Cut each text at a token boundary so that it has at most ``limit`` tokens."""
    out = []
    for text in texts:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offs = enc["offset_mapping"]
        if len(offs) > limit:
            text = text[: offs[max(0, limit - 1)][1]]
        if text.strip():
            out.append(text)
    return out


def load(m: ModelConfig) -> tuple[Any, Any, Any, float]:
    """Load a model for measuring: ``(model, device, dtype, seconds)``."""
    from fuselm.models import load_causal_lm, resolve_device, resolve_dtype

    device = resolve_device(m.device)
    dtype = resolve_dtype(m.dtype, device)
    t0 = time.perf_counter()
    model = load_causal_lm(m, device=device, dtype=dtype)
    return model, device, dtype, time.perf_counter() - t0


def common_blocks(
    cfg: PipelineConfig, toks: dict[str, Any], texts: list[str], domains: list[str]
) -> list[tuple[str, str]]:
    """The sample as ``(text, domain)`` blocks that fit every model, the same for all.

    Every model is measured on exactly these texts, so their cross-entropies on the gold
    text compare (the teachers-vs-target table). Each text is cut at a token boundary of
    every tokenizer in turn (a prefix that fits one still fits the ones before), and
    blocks are taken until the target has ``CAPTURE_BATCHES`` batches of
    ``capture.batch_tokens``.
    """
    from fuselm.models import model_context, special_tokens_added

    limits = []
    for m in cfg.models():
        tok = toks.get(m.resolved_name())
        if tok is not None:
            ctx = model_context(m)
            limit = min(ctx or cfg.corpus.block_tokens, cfg.corpus.block_tokens)
            limits.append((tok, max(2, limit - special_tokens_added(tok, m.bos))))
    target = toks.get(cfg.target.resolved_name())
    budget = CAPTURE_BATCHES * cfg.capture.batch_tokens
    out: list[tuple[str, str]] = []
    tokens = 0
    for text, dom in zip(texts, domains or ["default"] * len(texts), strict=True):
        if tokens >= budget:
            break
        for tok, limit in limits:
            text = (cut_to_tokens(tok, [text], limit) or [""])[0]
        if text.strip():
            out.append((text, dom))
            tokens += len(target(text, add_special_tokens=False)["input_ids"]) if target else 1
    return out


def measure_capture(
    cfg: PipelineConfig, m: ModelConfig, tok: Any, model: Any, blocks_in: list[tuple[str, str]]
) -> dict[str, Any]:
    """Time the capture path on the sample, keep its real top-k and its gold cross-entropy.

    Args:
        cfg: the pipeline config (``capture.*``, ``corpus.block_tokens``).
        m: the model's config.
        tok: its fast tokenizer.
        model: the loaded model (eval mode).
        blocks_in: ``(text, domain)`` from :func:`common_blocks` (the same for every model).

    Returns:
        ``tokens``, ``blocks``, ``seconds``, ``tokens_per_second``, ``bytes_per_position``
        (the real encoded rows as one shard), ``topk_mass_mean``, ``bits_per_byte`` per
        domain (and ``all``) of the gold text, and the private ``_topk`` ``(ids, logprobs)``
        arrays (N, K) for the mass measurement.
    """
    from fuselm.capture import storage
    from fuselm.capture.stage import Block, Capturer
    from fuselm.evaluate.scoring import LN2, predicted_bytes
    from fuselm.models import model_context
    from fuselm.preflight.estimate import parquet_bytes

    k = cfg.capture.top_k
    ctx = model_context(m)
    blocks = [Block(f"sample#{i}", f"{i:064x}", text) for i, (text, _) in enumerate(blocks_in)]
    if not blocks:
        raise ValueError("the sample has no text to capture")
    capturer = Capturer(
        model,
        tok,
        name=m.resolved_name(),
        top_k=k,
        batch_tokens=cfg.capture.batch_tokens,
        bos=m.bos,
        max_context=ctx,
    )
    warm = cut_to_tokens(tok, [blocks[0].text], 16)
    capturer.capture([Block("warmup", "0" * 64, warm[0] if warm else blocks[0].text)])
    lengths = [len(ids) for ids, _ in capturer.encode([b.text for b in blocks])]
    batches = sum(1 for _ in capturer.batches(lengths))
    t0 = time.perf_counter()
    rows = capturer.capture(blocks)
    dt = time.perf_counter() - t0
    n_tokens = sum(int(r["n_tokens"]) for r in rows)
    positions = sum(int(r["n_positions"]) for r in rows)
    decoded = [storage.decode_row(r, k) for r in rows]
    ids = np.concatenate([d.ids for d in decoded]) if decoded else np.zeros((0, k), np.int32)
    lps = np.concatenate([d.logprobs for d in decoded]) if decoded else np.zeros((0, k))
    mass = np.exp(lps.astype(np.float64)).sum(axis=1)
    sums: dict[str, list[float]] = {}
    for (text, dom), d in zip(blocks_in, decoded, strict=True):
        nll = -float(np.asarray(d.gold, np.float64).sum())
        nbytes = predicted_bytes(text, d.token_ids, d.offsets)
        for key in (dom, "all"):
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + nll, acc[1] + nbytes
    return {
        "bits_per_byte": {
            dom: round(nll / nbytes / LN2, 6) for dom, (nll, nbytes) in sums.items() if nbytes
        },
        "blocks": len(blocks),
        "batches": batches,
        "tokens": n_tokens,
        "seconds": dt,
        "tokens_per_second": n_tokens / dt if dt > 0 else None,
        "bytes_per_position": parquet_bytes(rows, k) / positions if positions else None,
        "topk_mass_mean": float(mass.mean()) if len(mass) else None,
        "embedding_rows": capturer.embedding_rows,
        "vocab_size": capturer.vocab_size,
        "_topk": (ids, lps),
    }


def measure_train(
    cfg: PipelineConfig, m: ModelConfig, tok: Any, model: Any, texts: list[str]
) -> dict[str, Any]:
    """Time a few optimiser steps of the target with the sparse combined loss.

    One untimed warm-up step, then ``TRAIN_STEPS`` timed steps of ``train.batch_size``
    sequences of ``min(train.seq_len, context)`` tokens (at most ``CPU_TRAIN_SEQ_CAP`` on a
    CPU: the rate per token is what is extrapolated). The model's weights change in
    memory; nothing is saved.

    Returns:
        ``seq_len``, ``batch_size``, ``seconds_per_step``, ``tokens_per_second``,
        ``precision`` and, on CUDA, ``peak_memory_bytes``.
    """
    import torch

    from fuselm.models import model_context, resolve_dtype
    from fuselm.train.losses import combined_loss

    t = cfg.train
    device = next(model.parameters()).device
    precision = resolve_dtype(t.precision, device)
    seq = min(t.seq_len, model_context(m) or t.seq_len)
    if device.type == "cpu":
        seq = min(seq, CPU_TRAIN_SEQ_CAP)
    stream = np.concatenate(
        [np.asarray(tok(x, add_special_tokens=False)["input_ids"], np.int64) for x in texts]
    )
    need = t.batch_size * seq * (TRAIN_STEPS + 1)
    if len(stream) == 0:
        raise ValueError("the sample has no target tokens to train on")
    stream = np.resize(stream, need)  # repeats a short sample
    vocab = int(model.get_output_embeddings().weight.shape[0])
    k = min(cfg.capture.top_k, vocab)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
    )
    amp = device.type == "cuda" and precision != torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> None:
        x = torch.from_numpy(stream[i * t.batch_size * seq : (i + 1) * t.batch_size * seq])
        x = x.view(t.batch_size, seq).to(device)
        # Synthetic teacher: k distinct ids per row (gold + evenly spaced offsets).
        stride = max(1, vocab // k)
        ids = (x.unsqueeze(-1) + torch.arange(k, device=device) * stride) % vocab
        lps = torch.log_softmax(-torch.arange(k, device=device, dtype=torch.float32), -1)
        lps = lps.expand(t.batch_size, seq, k)
        with torch.autocast(device.type, dtype=precision, enabled=amp):
            logits = model(input_ids=x, use_cache=False).logits
        loss, _ = combined_loss(
            logits,
            x,
            ids,
            lps,
            lam=t.clm_weight,
            kind=t.fusion_loss,
            temperature=t.temperature,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(1, TRAIN_STEPS + 1):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_step = (time.perf_counter() - t0) / TRAIN_STEPS
    model.eval()
    out: dict[str, Any] = {
        "seq_len": seq,
        "batch_size": t.batch_size,
        "seconds_per_step": per_step,
        "tokens_per_second": t.batch_size * seq / per_step,
        "precision": str(precision).removeprefix("torch."),
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
