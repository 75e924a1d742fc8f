"""The record the align stage writes per (source, block), and train reads.

This is the contract between stage 3 (align) and stages 4-5 (fuse + train): everything is
already in the TARGET's tokenization and vocabulary, so fusion and training never look at
a source tokenizer again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AlignedBlock:
    """One source's distributions aligned onto one target block.

    The target block has ``T`` tokens (``input_ids``, target BOS included when the target's
    policy adds it) and ``P = T - 1`` positions; position ``t`` predicts target token
    ``t + 1`` (Hugging Face causal-LM convention, same as the capture stage).

    Attributes:
        hash: content hash of the block text (join key with prepare and other sources).
        block_id: ``doc_id#index`` from prepare (for messages).
        domain: the block's domain label.
        split: ``train`` or ``validation``.
        input_ids: ``(T,)`` int32 target token ids of the block.
        ids: ``(P, K)`` int32 teacher top-k ids in the TARGET vocabulary, -1 padded.
        logprobs: ``(P, K)`` float32 their log-probabilities, -inf on padding (mass of
            source tokens that map to the same target id already summed).
        valid: ``(P,)`` bool: the source has a prediction for this target position (the
            fallback -- one-hot of the next gold token, or masking -- is applied later,
            by the consumer, according to ``align.fallback``).
        gold: ``(P,)`` float32 the source's log-probability of its own gold next token at
            the matched source position (0 where not valid).
        next_bytes: ``(P,)`` int32 UTF-8 bytes of text covered by that source gold token
            (0 where not valid); per-byte cross-entropies are ``-sum(gold)/sum(next_bytes)``.
        nll_sum: the source's total negative log-likelihood over ALL its positions in the
            block (not only the aligned ones), in nats.
        nll_bytes: UTF-8 bytes of text those positions predict; ``nll_sum / nll_bytes`` is
            the source's per-byte cross-entropy on the block (sequence-level MinCE uses it,
            so sources are compared on the same text whatever their alignment coverage).
        tail_logmass: ``(P,)`` float32 log of the teacher's probability mass outside its
            aligned ``ids`` at each valid position (-inf elsewhere): the mass capture left
            outside the top-k plus the mass of top-k entries the vocabulary map could not
            place. ``exp(logsumexp(logprobs[t])) + exp(tail_logmass[t]) = 1`` up to the
            quantisation, so a loss that keeps the tail loses no mass silently.
        one_to_one: ``(P,)`` bool: the target's next token and the source's next token at
            the matched position cover the same text (both boundaries shared), so the
            teacher's distribution is over the very token the target predicts.
        target_mask: ``(P,)`` bool, chat blocks only: positions that are trained at all
            (their next token is assistant text or the end of an assistant turn); prompt
            positions are masked out of both loss terms. None = every position.
    """

    hash: str
    block_id: str
    domain: str
    split: str
    input_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    valid: np.ndarray
    gold: np.ndarray
    next_bytes: np.ndarray
    nll_sum: float
    nll_bytes: int
    tail_logmass: np.ndarray
    one_to_one: np.ndarray
    target_mask: np.ndarray | None = None

    @property
    def n_positions(self) -> int:
        """``P = T - 1`` (0 for a block of fewer than two target tokens)."""
        return max(int(self.input_ids.shape[0]) - 1, 0)

    def ce_per_byte(self) -> float:
        """The source's cross-entropy on the whole block in nats per byte (inf if empty)."""
        return self.nll_sum / self.nll_bytes if self.nll_bytes > 0 else float("inf")
