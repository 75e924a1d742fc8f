"""One tokenization of a block as the alignment DP sees it (``TokenSeq``).

Separate from the DP so that the DP (``dtw.py``) and the check of its pairings against
the text (``verify.py``) share the record without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fuselm.align.surface import WORDPIECE, VocabSurface


@dataclass(frozen=True)
class TokenSeq:
    """One tokenization of a block, as the DP needs it.

    Attributes:
        forms: normalised surface bytes per position (``VocabSurface.forms``; ``b""`` for
            control tokens). ``str`` items are UTF-8 encoded.
        special: (n,) bool control tokens without text (BOS, EOS, padding).
        unknown: (n,) bool tokens that stand for text the tokenizer did not keep
            (``[UNK]``); wildcards in the DP.
        keeps_whitespace: the tokens carry the text's whitespace (False for WordPiece).
        adds_prefix_space: the tokenizer prepends a space the text may not have.
        tokenizer: fingerprint of the tokenizer, if known. Two sequences from the same
            tokenizer may trust equal ``[UNK]`` tokens to hide equal text.
        unk_is_word: an ``[UNK]`` replaces exactly one whole pre-tokenized word
            (WordPiece); only then can the text it hides be read off the other side.
    """

    forms: list[bytes]
    special: np.ndarray = field(default=None)  # type: ignore[assignment]
    unknown: np.ndarray = field(default=None)  # type: ignore[assignment]
    keeps_whitespace: bool = True
    adds_prefix_space: bool = False
    tokenizer: str | None = None
    unk_is_word: bool = False

    def __post_init__(self) -> None:
        """Normalise types and fill default masks."""
        forms = [f.encode("utf-8") if isinstance(f, str) else bytes(f) for f in self.forms]
        object.__setattr__(self, "forms", forms)
        n = len(forms)
        for name in ("special", "unknown"):
            v = getattr(self, name)
            v = np.zeros(n, bool) if v is None else np.asarray(v, bool)
            if v.shape != (n,):
                raise ValueError(f"{name} has shape {v.shape}, expected ({n},)")
            object.__setattr__(self, name, v)

    def __len__(self) -> int:
        """Number of positions."""
        return len(self.forms)

    @classmethod
    def from_ids(
        cls, ids: np.ndarray, surface: VocabSurface, offsets: np.ndarray | None = None
    ) -> TokenSeq:
        """Build from token ids and the tokenizer's ``VocabSurface``.

        Args:
            ids: (n,) int token ids.
            surface: the tokenizer's surface forms.
            offsets: optional (n, 2) offsets; a special token covering text (a literal
                ``<|endoftext|>``) then counts as text. Without offsets every special
                token except ``[UNK]`` is a control token.
        """
        ids = np.asarray(ids, np.int64)
        unknown = surface.is_unknown(ids)
        special = surface.special[ids] & ~unknown
        if offsets is not None:
            off = np.asarray(offsets).reshape(-1, 2)
            special &= off[:, 1] <= off[:, 0]
        forms = surface.forms
        pieces = [forms[i] if not special[k] else b"" for k, i in enumerate(ids.tolist())]
        # A special token that covers text contributes its literal spelling.
        for k in np.flatnonzero(surface.special[ids] & ~special & ~unknown):
            pieces[k] = surface.pieces[ids[k]].encode("utf-8")
        return cls(
            forms=pieces,
            special=special,
            unknown=unknown,
            keeps_whitespace=surface.info.keeps_whitespace,
            adds_prefix_space=surface.info.adds_prefix_space,
            tokenizer=surface.fingerprint,
            unk_is_word=surface.info.family == WORDPIECE,
        )


def as_seq(x: TokenSeq | Sequence[str | bytes]) -> TokenSeq:
    """Plain strings/bytes are text tokens of a whitespace-keeping tokenizer."""
    return x if isinstance(x, TokenSeq) else TokenSeq(forms=list(x))
