"""Scoring for the reproduction: per-token likelihoods, bits per byte, output-level ensembles.

A model is run once over a set of held-out blocks through fuselm's own capture runner
(:class:`fuselm.capture.runner.Capturer`, the code path of ``fuselm eval``), and what is kept
per block is the log-probability of every gold token it predicted and the UTF-8 byte at
which that token ends. From that alone:

- bits per byte per domain (sums of NLL over sums of bytes, like ``fuselm eval``);
- the output-level ensemble of several models, including models with different
  tokenizers (``ensemble_scores``, see there for why it is done per text segment).

Scores are cached on disk by (model identity, blocks), so a rerun or a bigger table does
not run a model twice over the same text.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TokenScores:
    """One model on one block. P predicted tokens.

    Attributes:
        start: byte where the predicted text starts (end of the unpredicted first token).
        ends: ``(P,)`` byte at which each predicted token ends (non-decreasing; the last
            one is the end of the text, so text no token covers is charged to it).
        gold: ``(P,)`` natural-log probability of each predicted token.
    """

    start: int
    ends: np.ndarray
    gold: np.ndarray

    @property
    def nll(self) -> float:
        """Negative log-likelihood in nats of the predicted text."""
        return float(-np.asarray(self.gold, dtype=np.float64).sum())

    @property
    def n_bytes(self) -> int:
        """Bytes of the predicted text."""
        return int(self.ends[-1]) - self.start if len(self.ends) else 0


def token_scores(text: str, offsets: np.ndarray, gold: np.ndarray) -> TokenScores:
    """Turn a capture row (character offsets, gold log-probs) into byte-level scores.

    Args:
        text: the block text.
        offsets: ``(T, 2)`` character offsets of the T tokens (BOS at ``(0, 0)``).
        gold: ``(T - 1,)`` log-probability of tokens ``1..T-1``.
    """
    total = len(text.encode("utf-8"))
    if len(offsets) < 2:
        return TokenScores(total, np.zeros(0, np.int64), np.zeros(0, np.float32))
    # Byte offset of every character end, so byte-level BPE halves of one character and
    # tokenizers that report characters both land on the same byte boundaries.
    char_bytes = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    ends = char_bytes[np.asarray(offsets[:, 1], dtype=np.int64)]
    ends = np.maximum.accumulate(ends)  # trimmed whitespace tokens may report earlier ends
    first = int(ends[0]) if offsets[0, 1] > offsets[0, 0] else 0
    pred_ends = ends[1:].copy()
    pred_ends[-1] = total
    return TokenScores(first, pred_ends.astype(np.int64), np.asarray(gold, dtype=np.float32))


def score_model(
    model_dir: str | Path,
    blocks: Sequence[dict[str, Any]],
    cache_dir: Path,
    key: str,
    batch_tokens: int = 4096,
) -> dict[str, TokenScores]:
    """Score ``blocks`` with the model in ``model_dir`` (cached under ``cache_dir/key``).

    Args:
        model_dir: a saved causal LM folder (tokenizer included).
        blocks: prepare records with ``hash``, ``block_id``, ``domain``, ``text``.
        cache_dir: where score files live.
        key: the model's identity (weights digest or train-stage fingerprint); the cache
            file name combines it with a digest of the blocks.
    """
    digest = hashlib.sha256("".join(b["hash"] for b in blocks).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{key[:32]}-{digest}.npz"
    if path.exists():
        return _load(path, blocks)
    import torch

    from fuselm.capture import storage
    from fuselm.capture.runner import Block, Capturer
    from fuselm.config import ModelConfig
    from fuselm.models import ensure_fast_tokenizer, load_causal_lm, load_tokenizer

    mc = ModelConfig(model=str(model_dir), bos="none")
    tok, _ = ensure_fast_tokenizer(mc, load_tokenizer(mc))
    model = load_causal_lm(mc, device=torch.device("cpu"), dtype=torch.float32)
    runner = Capturer(
        model, tok, name=Path(model_dir).name, top_k=1, batch_tokens=batch_tokens, bos="none"
    )
    rows = runner.capture([Block(b["block_id"], b["hash"], b["text"]) for b in blocks])
    out = {}
    for b, row in zip(blocks, rows, strict=True):
        dec = storage.decode_row(row, 1)
        out[b["hash"]] = token_scores(b["text"], dec.offsets, dec.gold)
    del model
    _save(path, out)
    return out


def _save(path: Path, scores: dict[str, TokenScores]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for i, (h, s) in enumerate(scores.items()):
        arrays[f"h{i}"] = np.frombuffer(h.encode(), dtype=np.uint8)
        arrays[f"s{i}"] = np.asarray([s.start], np.int64)
        arrays[f"e{i}"] = s.ends
        arrays[f"g{i}"] = s.gold
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _load(path: Path, blocks: Sequence[dict[str, Any]]) -> dict[str, TokenScores]:
    data = np.load(path)
    n = sum(1 for k in data.files if k.startswith("h"))
    out = {}
    for i in range(n):
        h = bytes(data[f"h{i}"]).decode()
        out[h] = TokenScores(int(data[f"s{i}"][0]), data[f"e{i}"], data[f"g{i}"])
    missing = [b["hash"] for b in blocks if b["hash"] not in out]
    if missing:
        raise ValueError(f"{path}: cached scores lack {len(missing)} blocks; delete the file")
    return out


def bits_per_byte(
    scores: dict[str, TokenScores], blocks: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """Bits per byte per domain (and ``__all__``): summed NLL over summed bytes."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for b in blocks:
        s = scores[b["hash"]]
        for key in (b["domain"], "__all__"):
            acc[key][0] += s.nll
            acc[key][1] += s.n_bytes
    return {k: (v[0] / v[1] / LN2 if v[1] else float("nan")) for k, v in acc.items()}


def ensemble_block(members: Sequence[TokenScores]) -> TokenScores:
    """The equal-weight output-level ensemble of several models on one block.

    With one tokenizer, the ensemble's distribution at every position is the average of
    the members' distributions, so the probability it gives the gold token is the average
    of theirs: ``log mean_m p_m(x_t | x_<t)``.

    With different tokenizers there is no common position or vocabulary to average over.
    What the members do share is the text: at every byte boundary where *all* of them end
    a token, each member has assigned a probability to the text between that boundary and
    the next shared one, conditioned on the same text before it (the product of its token
    probabilities over that segment, under its own tokenization). The ensemble averages
    those segment probabilities. This is the finest granularity at which the members'
    predictions are about the same event, it reduces exactly to per-token averaging when
    the tokenizations agree, and the result is still a likelihood of the same bytes, so
    bits per byte stay comparable. (Each member's segment probability counts only its own
    canonical tokenization of the segment, the usual convention of every LM evaluation.)

    Returns:
        The ensemble's scores, one "token" per shared segment.
    """
    if len(members) == 1:
        return members[0]
    starts = [m.start for m in members]
    shared = set(int(e) for e in members[0].ends) | {members[0].start}
    for m in members[1:]:
        shared &= set(int(e) for e in m.ends) | {m.start}
    lo = max(starts)
    cuts = np.array(sorted(b for b in shared if b >= lo), dtype=np.int64)
    if len(cuts) < 2:
        return TokenScores(lo, np.zeros(0, np.int64), np.zeros(0, np.float32))
    seg = np.zeros((len(members), len(cuts) - 1))
    for i, m in enumerate(members):
        keep = m.ends > cuts[0]
        # segment j covers bytes (cuts[j], cuts[j+1]]: the tokens ending inside it.
        idx = np.searchsorted(cuts, m.ends[keep], side="left") - 1
        np.add.at(seg[i], idx, np.asarray(m.gold, np.float64)[keep])
    mx = seg.max(axis=0)
    mix = mx + np.log(np.exp(seg - mx).mean(axis=0))
    return TokenScores(int(cuts[0]), cuts[1:], mix.astype(np.float64))


def ensemble_scores(
    members: Sequence[dict[str, TokenScores]], blocks: Sequence[dict[str, Any]]
) -> dict[str, TokenScores]:
    """``ensemble_block`` for every block."""
    return {b["hash"]: ensemble_block([m[b["hash"]] for m in members]) for b in blocks}
