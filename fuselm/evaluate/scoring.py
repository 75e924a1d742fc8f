"""Scoring a model on held-out blocks: NLL, predicted bytes, bits per byte per domain.

Why a module of its own: this is the measurement (what counts as a predicted byte, how a
chat block is scored, how NLL and bytes are summed into bits per byte), shared by the
eval stage and by anything else that needs a model's bits per byte; it neither decides
which models to score nor writes results (that is :mod:`fuselm.evaluate.stage`).
``score_blocks`` runs a model with the capture stage's runner; ``capture_scores`` reads
the same figures from an existing capture. Both give per-token traces, and
:func:`shared_scores` counts every model over the same bytes of each block (the fair
comparison); :func:`own_scores` counts one model alone from its first prediction.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.artifacts import StageError

log = logging.getLogger("fuselm.eval")

LN2 = math.log(2.0)


@dataclass(frozen=True)
class BlockScore:
    """One model's likelihood of one block."""

    hash: str
    domain: str
    nll: float  # nats, summed over the predicted tokens
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text those tokens cover


@dataclass(frozen=True)
class BlockTrace:
    """One model's per-token predictions of one plain-text block, in UTF-8 byte terms.

    What makes bits per byte fair across models: scored over the *same bytes*
    (:func:`shared_scores`). A model that adds a BOS predicts the block's first token,
    one without a BOS cannot; counting that first token for one and not the other is worth
    about 0.01 bits/byte at 256-token blocks, more than the differences fusion makes.

    Attributes:
        hash: the block's content hash.
        domain: its domain.
        start: byte where the predictions begin (the end of the first token, 0 after a BOS).
        ends: ``(P,)`` byte at which each predicted token ends (non-decreasing).
        gold: ``(P,)`` log-probability of each predicted token.
        text: ``(P,)`` the prediction is of a text token (False for an EOS/SEP after the
            text: it predicts no byte, and only some tokenizers add it).
        total: bytes of the whole block text (trailing text no token covers, whitespace a
            WordPiece tokenizer drops, belongs to the last prediction).
    """

    hash: str
    domain: str
    start: int
    ends: np.ndarray
    gold: np.ndarray
    text: np.ndarray
    total: int

    def boundaries(self) -> set[int]:
        """Bytes from which this model's predictions can be counted exactly."""
        return {self.start, *(int(e) for e in self.ends[self.text])}

    def score(self, from_byte: int | None = None) -> BlockScore:
        """The NLL of the text tokens predicted after ``from_byte`` (default: ``start``)."""
        s0 = self.start if from_byte is None else int(from_byte)
        prev = np.concatenate([[self.start], self.ends[:-1]]) if len(self.ends) else self.ends
        keep = self.text & (prev >= s0)
        return BlockScore(
            hash=self.hash,
            domain=self.domain,
            nll=float(-np.asarray(self.gold, np.float64)[keep].sum()),
            tokens=int(keep.sum()),
            bytes=max(self.total - s0, 0),
        )


def shared_start(traces: Sequence[BlockTrace]) -> int:
    """The first byte every model can start counting from: a boundary of every model.

    At or after the latest ``start`` (a model without BOS starts after its first token);
    the block's length when the models share no boundary there (the block then counts for
    none of them).
    """
    lo = max(t.start for t in traces)
    common = set.intersection(*(t.boundaries() for t in traces))
    return min((b for b in common if b >= lo), default=max(t.total for t in traces))


def shared_scores(
    per_model: dict[str, Sequence[BlockTrace | BlockScore]],
) -> dict[str, list[BlockScore]]:
    """Every model's block scores over the same bytes of every block.

    Args:
        per_model: model name -> its traces (plain text) or scores (chat blocks, already
            on a shared denominator: the assistant text), all in the same block order.

    Returns:
        model name -> ``BlockScore`` per block, each block counted from
        :func:`shared_start` of its plain-text traces.
    """
    names = list(per_model)
    n = len(per_model[names[0]]) if names else 0
    out: dict[str, list[BlockScore]] = {m: [] for m in names}
    for i in range(n):
        row = [per_model[m][i] for m in names]
        traces = [t for t in row if isinstance(t, BlockTrace)]
        s0 = shared_start(traces) if len(traces) == len(row) else None
        for m, t in zip(names, row, strict=True):
            out[m].append(t.score(s0) if isinstance(t, BlockTrace) else t)
    return out


def own_scores(traces: Sequence[BlockTrace | BlockScore]) -> list[BlockScore]:
    """One model's scores, each block counted from the model's own first prediction."""
    return [t.score() if isinstance(t, BlockTrace) else t for t in traces]


def predicted_bytes(text: str, token_ids: np.ndarray, offsets: np.ndarray) -> int:
    """UTF-8 bytes of ``text`` covered by the predicted tokens (all but the first).

    Args:
        text: the block text.
        token_ids: ``(T,)`` the model's tokens of the block (BOS included if added).
        offsets: ``(T, 2)`` their character offsets; specials (BOS) sit at ``(0, 0)``.

    Returns:
        Bytes from the end of the first token (0 when it is an empty-span special such as
        BOS) to the end of the text. Trailing text no token covers (whitespace a WordPiece
        tokenizer drops) belongs to the last prediction.
    """
    if len(token_ids) < 2:
        return 0
    start, end = int(offsets[0][0]), int(offsets[0][1])
    first_end = 0 if end <= start else end
    return len(text[first_end:].encode("utf-8"))


def block_trace(block: dict[str, Any], offsets: np.ndarray, gold: Any) -> BlockTrace:
    """A plain-text block's trace from a model's token offsets and gold log-probabilities."""
    text = block["text"]
    total = len(text.encode("utf-8"))
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    gold = np.asarray(gold, np.float64)
    if len(off) < 2:
        empty = np.zeros(0)
        return BlockTrace(block["hash"], block["domain"], total, empty, empty, empty > 0, total)
    # Byte offset of every character end: byte-level BPE halves of one character and
    # tokenizers that report characters land on the same byte boundaries.
    char_bytes = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    span = off[:, 1] > off[:, 0]  # empty spans are specials (BOS, EOS, SEP)
    ends = np.maximum.accumulate(np.where(span, char_bytes[off[:, 1]], 0))
    start = int(ends[0]) if span[0] else 0
    pred_ends, is_text = ends[1:].copy(), span[1:].copy()
    if is_text.any():  # the text no token covers, at the end, goes with the last prediction
        pred_ends[np.flatnonzero(is_text)[-1] :] = total
    return BlockTrace(block["hash"], block["domain"], start, pred_ends, gold, is_text, total)


SCORE_CHUNK = 512  # blocks per runner call in score_blocks


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Convert a NLL in nats over ``n_bytes`` into bits per byte (nan if no bytes)."""
    return nll / n_bytes / LN2 if n_bytes > 0 else float("nan")


def score_blocks(
    model: Any,
    tokenizer: Any,
    blocks: Sequence[dict[str, Any]],
    *,
    name: str,
    bos: str = "auto",
    batch_tokens: int = 8192,
    max_context: int | None = None,
    chat_template: str | None = None,
) -> list[BlockTrace | BlockScore]:
    """Score blocks with a loaded model through the capture runner (top-1 is enough).

    Plain-text blocks give a :class:`BlockTrace` (turn them into scores with
    :func:`shared_scores` next to other models, or :func:`own_scores` alone); chat blocks
    a :class:`BlockScore` of their assistant text.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its fast tokenizer.
        blocks: prepare records (``hash``, ``block_id``, ``domain``, ``text``).
        name: the model's name, for messages.
        bos: the BOS policy (as in capture).
        batch_tokens: tokens per forward batch.
        max_context: the model's context (longer blocks are an error, never truncated).
        chat_template: the model's chat template (chat blocks are rendered with it and
            scored on their assistant text only).
    """
    from fuselm.capture import storage
    from fuselm.capture.runner import Block, Capturer

    runner = Capturer(
        model,
        tokenizer,
        name=name,
        top_k=1,
        batch_tokens=batch_tokens,
        bos=bos,
        max_context=max_context,
        chat_template=chat_template,
    )
    from fuselm.chat import loads

    out = []
    render = _renderer(tokenizer, chat_template, name)
    # In chunks: the runner's per-block arrays of one chunk at a time, never the whole split.
    for start in range(0, len(blocks), SCORE_CHUNK):
        chunk = blocks[start : start + SCORE_CHUNK]
        rows = runner.capture(
            [Block(b["block_id"], b["hash"], b["text"], loads(b.get("messages"))) for b in chunk]
        )
        for b, row in zip(chunk, rows, strict=True):
            dec = storage.decode_row(row, 1)
            out.append(_score(b, dec.token_ids, dec.offsets, dec.gold, render))
    return out


def _renderer(tokenizer: Any, template: str | None, name: str) -> Any:
    """``messages -> Rendered`` for one model (None without chat data)."""
    if template is None:
        return None
    from fuselm.chat import render

    return lambda messages: render(tokenizer, messages, template, name)


def _score(
    block: dict[str, Any], token_ids: np.ndarray, offsets: np.ndarray, gold, render: Any = None
) -> BlockTrace | BlockScore:
    """One block's trace; a chat block's score counts its assistant text only.

    For a conversation, the positions that predict assistant tokens (in the model's own
    rendering) are scored and divided by the UTF-8 bytes of the assistant contents, the
    same denominator for every model whatever its template.
    """
    if block.get("messages"):
        from fuselm.chat import content_bytes, loads, scored_positions

        if render is None:
            raise StageError(f"eval: block {block['block_id']} is a conversation; no template")
        messages = loads(block["messages"])
        mask = scored_positions(offsets, render(messages))[: len(gold)]
        return BlockScore(
            hash=block["hash"],
            domain=block["domain"],
            nll=float(-np.asarray(gold, dtype=np.float64)[mask].sum()),
            tokens=int(mask.sum()),
            bytes=content_bytes(messages),
        )
    return block_trace(block, offsets, gold)


def capture_scores(
    run_dir: Path, source: str, blocks: Sequence[dict[str, Any]], render: Any = None
) -> list[BlockTrace | BlockScore]:
    """A source's traces (scores for chat blocks) on ``blocks`` read from its capture.

    Raises:
        StageError: the capture lacks one of the blocks (it was made from other blocks).
    """
    return _read_capture(run_dir, source, blocks, render)[0]


def _read_capture(
    run_dir: Path, source: str, blocks: Sequence[dict[str, Any]], render: Any = None
) -> tuple[list[BlockTrace | BlockScore], float]:
    """One pass over a source's capture: its scores, and its share of lossless blocks.

    The share counts the blocks whose text the source's tokens reproduce exactly.
    """
    from fuselm.capture.storage import iter_capture

    want = {b["hash"]: b for b in blocks}
    found: dict[str, BlockTrace | BlockScore] = {}
    lossy = 0
    for cb in iter_capture(run_dir, source, split="validation"):
        if cb.hash in want and cb.hash not in found:
            found[cb.hash] = _score(want[cb.hash], cb.token_ids, cb.offsets, cb.gold, render)
            lossy += not cb.text_roundtrip
    if lossy:
        # A tokenizer that cannot reproduce the text ([UNK], dropped whitespace, lower-
        # casing) is never asked to predict what it drops: its bits per byte flatter it.
        log.warning(
            "eval: '%s' does not reproduce the text of %d of %d held-out blocks; its bits "
            "per byte are optimistic (it never pays for what its tokenizer drops)",
            source,
            lossy,
            len(found),
        )
    missing = [h for h in want if h not in found]
    if missing:
        raise StageError(
            f"eval: capture of '{source}' lacks {len(missing)} held-out blocks (e.g. "
            f"{want[missing[0]]['block_id']}); rerun `fuselm capture` (it may be stale)"
        )
    lossless = 1.0 - lossy / len(found) if found else float("nan")
    return [found[b["hash"]] for b in blocks], lossless


def aggregate(scores: Iterable[BlockScore], perplexity: bool = False) -> dict[str, Any]:
    """Bits per byte overall and per domain (sums of NLL and bytes, not means of ratios)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for s in scores:
        for key in ("__all__", s.domain):
            acc = sums[key]
            acc[0] += s.nll
            acc[1] += s.tokens
            acc[2] += s.bytes

    def row(acc: list[float]) -> dict[str, Any]:
        out = {
            "bits_per_byte": bits_per_byte(acc[0], int(acc[2])),
            "nll_nats": acc[0],
            "tokens": int(acc[1]),
            "bytes": int(acc[2]),
        }
        if perplexity:
            out["perplexity"] = math.exp(acc[0] / acc[1]) if acc[1] else float("nan")
        return out

    return {
        "overall": row(sums["__all__"]),
        "domains": {d: row(a) for d, a in sorted(sums.items()) if d != "__all__"},
    }
