"""Alignment methods with one calling convention, for the registry in ``__init__``.

Each method takes the block text and the two tokenizations (``Tokenized``: ids, offsets,
surface forms) and returns, for every target position, the source position whose
prediction it takes (-1: none; the caller falls back to the next gold token or masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fuselm.align.dtw import TokenSeq, align_mined_dp
from fuselm.align.offsets import align_offsets, special_positions
from fuselm.align.surface import VocabSurface, vocab_surface


@dataclass(frozen=True)
class Tokenized:
    """One tokenization of a block.

    Attributes:
        ids: (n,) int64 token ids.
        offsets: (n, 2) int64 character offsets into the block text, or None when the
            tokenizer gives none (only ``mined_dp`` works then).
        surface: the tokenizer's ``VocabSurface``.
    """

    ids: np.ndarray
    offsets: np.ndarray | None
    surface: VocabSurface

    def __post_init__(self) -> None:
        """Validate shapes and id range."""
        ids = np.asarray(self.ids, np.int64)
        object.__setattr__(self, "ids", ids)
        if self.offsets is not None:
            off = np.asarray(self.offsets, np.int64).reshape(-1, 2)
            if len(off) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(off)} offsets")
            object.__setattr__(self, "offsets", off)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.surface)):
            raise ValueError(
                f"token id {int(ids.max())} outside the tokenizer's {len(self.surface)} ids"
            )

    def special(self) -> np.ndarray:
        """(n,) bool control tokens without text."""
        if self.offsets is None:
            return self.surface.special[self.ids] & ~self.surface.is_unknown(self.ids)
        return special_positions(self.ids, self.offsets, self.surface)

    def token_seq(self) -> TokenSeq:
        """The ``TokenSeq`` view for ``mined_dp``."""
        return TokenSeq.from_ids(self.ids, self.surface, self.offsets)


def tokenize(tok: Any, text: str, add_special_tokens: bool = True) -> Tokenized:
    """Tokenize ``text`` with a fast tokenizer, keeping offsets.

    Args:
        tok: a transformers fast tokenizer.
        text: the block text.
        add_special_tokens: add BOS/EOS as the model sees them in training.

    Returns:
        The ``Tokenized`` block.
    """
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    return Tokenized(
        ids=np.asarray(enc["input_ids"], np.int64),
        offsets=np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2),
        surface=vocab_surface(tok),
    )


def offsets_method(text: str, src: Tokenized, tgt: Tokenized) -> np.ndarray:
    """``offsets``: exact alignment from character offsets (see ``offsets.py``)."""
    if src.offsets is None or tgt.offsets is None:
        raise ValueError("the 'offsets' alignment needs offsets on both sides; use 'mined_dp'")
    return align_offsets(
        src.offsets,
        tgt.offsets,
        src.special(),
        tgt.special(),
        text=text,
        src_nbytes=src.surface.text_nbytes()[src.ids],
        tgt_nbytes=tgt.surface.text_nbytes()[tgt.ids],
    )


def mined_dp_method(text: str, src: Tokenized, tgt: Tokenized) -> np.ndarray:
    """``mined_dp``: DTW over token strings, verified (see ``dtw.py``); ignores ``text``."""
    del text  # the DP works on token strings only
    return align_mined_dp(src.token_seq(), tgt.token_seq())
