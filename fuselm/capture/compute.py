"""Top-k next-token log-probabilities from a batch of logits: pure tensor functions.

No model, no files: logits in, small tensors out. What the capture stage stores per
position (SPEC.md section 2, stage 2):

- the top-k token ids and their log-probabilities under ``log_softmax`` over the *real*
  vocabulary (true probabilities, not raw logits);
- the log-probability of the gold next token;
- the log of the probability mass outside the top-k, so that later stages can
  renormalise the top-k or keep the rest as one tail bucket.

Why not ``torch.topk(torch.log_softmax(x))``: that writes a second full-vocabulary tensor
and sorts through all of it. Here ``logsumexp`` is taken once, and the top-k comes from a
two-level search (``_grouped_topk``): the vocabulary is cut into groups of 64 columns, the
k groups with the largest maxima are kept, and the exact top-k is taken among their
columns only. Both steps are vectorised passes, several times faster than a top-k over
the whole row on CPU, and the result is exact (see ``_grouped_topk``). Rows are processed
in chunks so that temporaries stay bounded (16 MB on a CPU, 256 MB on a GPU).

Padded vocabularies (Qwen-style embeddings with more rows than the tokenizer has tokens):
columns ``>= vocab_size`` are not tokens, so they are excluded *before* the softmax, which
renormalises the mass over the real tokens. The mass they would have taken is reported
(``pad_logmass``) so the stage can record how much was dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

GROUP = 64  # columns per group of the two-level top-k search
CHUNK_ELEMENTS = 1 << 22  # logits per chunk of rows on a CPU (16 MB in float32: cache-sized)
CHUNK_ELEMENTS_ACCEL = 1 << 26  # on a GPU (256 MB): fewer, larger kernels


class NonFiniteLogitsError(ValueError):
    """A row of logits holds NaN or +inf (or only -inf); ``row`` is its index in the input."""

    def __init__(self, row: int) -> None:
        """Record the first bad row."""
        super().__init__(f"non-finite logits (NaN or inf) at row {row}")
        self.row = row


@dataclass
class TopK:
    """Per-position top-k of the next-token distribution (N positions, K entries).

    Attributes:
        ids: ``(N, K)`` int64 token ids, most probable first.
        logprobs: ``(N, K)`` float32 log-probabilities of ``ids`` (descending).
        gold: ``(N,)`` float32 log-probability of the gold next token (NaN where no gold
            id was given).
        tail_logmass: ``(N,)`` float32 ``log(1 - sum(exp(logprobs)))``: the log of the mass
            outside the top-k (``-inf`` when the top-k holds the whole vocabulary).
        pad_logmass: ``(N,)`` float32 log of the mass the padded columns would have held
            under a softmax over all columns (``-inf`` when there is no padding).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    gold: torch.Tensor
    tail_logmass: torch.Tensor
    pad_logmass: torch.Tensor


def _grouped_topk(x: torch.Tensor, k: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k along the last dim via group maxima.

    Why it is exact: an entry among the top k lies in a group whose maximum is at least
    that entry. If its group were not among the k groups with the largest maxima, those k
    groups would hold k entries at least as large, so it would not be in the top k (up to
    ties, whose order is arbitrary in ``torch.topk`` too). The last ``V % group`` columns
    are always candidates.

    Args:
        x: ``(N, V)`` floats; may be a column slice of a wider tensor.
        k: entries to keep (``k <= V``).
        group: columns per group.

    Returns:
        ``(values, ids)``, both ``(N, K)``, sorted descending.
    """
    n, v = x.shape
    g = v // group
    if g < 4 * k:  # small vocabulary: the plain search is as cheap
        return torch.topk(x, k, dim=-1)
    main = g * group
    gmax = x[:, :main].view(n, g, group).amax(dim=-1)  # (N, G)
    _, top_groups = torch.topk(gmax, k, dim=-1)  # (N, k)
    offs = torch.arange(group, device=x.device)
    cand = (top_groups.unsqueeze(-1) * group + offs).reshape(n, k * group)  # (N, k*group)
    if main < v:
        rest = torch.arange(main, v, device=x.device).expand(n, v - main)
        cand = torch.cat([cand, rest], dim=1)
    values, pos = torch.topk(x.gather(1, cand), k, dim=-1)  # (N, k)
    return values, cand.gather(1, pos)


def topk_logprobs(
    logits: torch.Tensor,
    k: int,
    gold_ids: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_rows: int | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TopK:
    """Top-k log-probabilities, gold log-probability and tail mass of each row of logits.

    Args:
        logits: ``(N, V_rows)`` logits of N positions, any float dtype, any device.
            Never copied as a whole: rows are processed ``chunk_rows`` at a time (upcast to
            float32 per chunk). With ``head``: ``(N, H)`` final hidden states instead.
        k: entries per position (``1 <= k <= vocab_size``).
        gold_ids: ``(N,)`` ids of the gold next tokens (``< vocab_size``), or None.
        vocab_size: number of real tokens; columns ``>= vocab_size`` (padded embedding
            rows) are excluded and the distribution renormalised over the real tokens.
            Default: all columns.
        chunk_rows: rows per chunk; default: about ``CHUNK_ELEMENTS`` logits per chunk
            (``CHUNK_ELEMENTS_ACCEL`` off the CPU).
        head: the output layer, ``(c, H) -> (c, V_rows)`` logits. When given, logits are
            computed one chunk at a time and no full ``(N, V_rows)`` tensor ever exists
            (why: on a GPU a batch of logits is the peak memory, e.g. 2.5 GB for 8k
            tokens x 152k vocabulary in bf16; on a CPU it is not faster, each chunk
            re-reads the output layer's weights).

    Returns:
        A ``TopK`` on the device of ``logits``.

    Raises:
        NonFiniteLogitsError: a row holds NaN or +inf, or nothing but -inf.
        ValueError: bad ``k``, ``vocab_size`` or gold ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    n, rows = logits.shape
    if head is not None:
        rows = int(head(logits[:1]).shape[-1]) if n else int(vocab_size or 1)

    def chunk(s: int, e: int) -> torch.Tensor:  # (c, V_rows) logits of rows s..e
        return logits[s:e] if head is None else head(logits[s:e])

    v = rows if vocab_size is None else int(vocab_size)
    if not 0 < v <= rows:
        raise ValueError(f"vocab_size {v} must be in 1..{rows} (the logits' width)")
    if not 1 <= k <= v:
        raise ValueError(f"k={k} must be in 1..{v} (the vocabulary size)")
    if n == 0:
        return TopK(
            ids=torch.empty(0, k, dtype=torch.long, device=logits.device),
            logprobs=torch.empty(0, k, device=logits.device),
            gold=torch.empty(0, device=logits.device),
            tail_logmass=torch.empty(0, device=logits.device),
            pad_logmass=torch.empty(0, device=logits.device),
        )
    if gold_ids is not None:
        if gold_ids.shape != (n,):
            raise ValueError(f"gold_ids must be ({n},), got {tuple(gold_ids.shape)}")
        if int(gold_ids.max()) >= v:
            raise ValueError(f"gold id {int(gold_ids.max())} >= vocab_size {v}")
    dev = logits.device
    budget = CHUNK_ELEMENTS if dev.type == "cpu" else CHUNK_ELEMENTS_ACCEL
    step = chunk_rows or max(1, budget // rows)
    ids = torch.empty(n, k, dtype=torch.long, device=dev)
    lps = torch.empty(n, k, dtype=torch.float32, device=dev)
    gold = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
    tail = torch.empty(n, dtype=torch.float32, device=dev)
    pad = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    buf = torch.empty(min(step, max(n, 1)), v, dtype=torch.float32, device=dev)
    for s in range(0, n, step):
        e = min(n, s + step)
        full = chunk(s, e)  # (c, V_rows)
        x = full[:, :v]  # (c, V) view: real columns only
        if x.dtype != torch.float32:
            x = x.float()
        c = e - s
        values, top = _grouped_topk(x, k)  # (c, K) raw logits, descending
        m = values[:, :1]  # (c, 1) row maximum (the top-1 logit)
        ex = torch.sub(x, m, out=buf[:c]).exp_()  # (c, V) exp(x - max), in [0, 1]
        total = ex.sum(dim=-1)  # (c,) >= 1 for a finite row
        # Tail mass summed directly over the non-top-k entries, not as 1 - sum(top-k):
        # the subtraction loses every digit when the top-k holds ~all of the mass.
        rest = ex.scatter_(1, top, 0.0).sum(dim=-1)  # (c,)
        lse = m[:, 0] + total.log()  # (c,) log-partition over the real vocabulary
        bad = ~torch.isfinite(lse)
        if bool(bad.any()):
            raise NonFiniteLogitsError(s + int(bad.nonzero()[0, 0]))
        ids[s:e] = top
        lps[s:e] = values - lse[:, None]
        tail[s:e] = rest.log() - total.log()
        if gold_ids is not None:
            g = gold_ids[s:e].to(dev).long().unsqueeze(1)  # (c, 1)
            gold[s:e] = x.gather(1, g)[:, 0] - lse
        if v < rows:  # log of the mass on padded columns under a full softmax
            pad_lse = torch.logsumexp(full[:, v:].float(), dim=-1)  # (c,)
            pad[s:e] = pad_lse - torch.logaddexp(lse, pad_lse)
    return TopK(ids=ids, logprobs=lps, gold=gold, tail_logmass=tail, pad_logmass=pad)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Mächler 2012).

    Used by readers that only have the top-k log-probabilities (``x`` = their
    logsumexp) and need the tail mass.
    """
    x = x.double()
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
