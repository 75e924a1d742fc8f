r"""Surface forms of tokenizer vocabularies: which text does each token id stand for?

Different tokenizer families spell the same text differently (SPEC 3, "vocabulary
mapping"):

- byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM2): every byte is shown as a printable
  stand-in character (``Ġ`` is the space byte, ``Ċ`` is ``\n``, ``Ã©`` is the two bytes of
  ``é``), so one token may even hold half of a UTF-8 character;
- SentencePiece-style (Llama-2, Mistral): ``▁`` is a space and ``<0x0A>`` is a raw byte
  (byte fallback);
- WordPiece (BERT): ``##`` marks a continuation; whitespace is not part of any token.

This module turns every vocabulary entry into the *bytes of text* it stands for, so that
tokens of different families can be compared byte for byte: ``Ġthe``, ``▁the`` and the
WordPiece word-start ``the`` all become ``b" the"``; ``Ċ``, ``<0x0A>`` and ``"\n"`` all
become ``b"\n"``. Special tokens (BOS, EOS, padding, chat markers) carry no text: they are
flagged and keep only their role.

The family is read from the tokenizer's backend JSON (model type, pre-tokenizer, decoder,
normalizer), never from the Python class name, so the same code works for fixtures,
GGUF-converted tokenizers and hub tokenizers alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
WORDPIECE = "wordpiece"
PLAIN = "plain"
FAMILIES = (BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, PLAIN)

# Roles a special token can play; a source special token maps only to the target token
# with the same role (vocab.py). Order = preference when one token has several roles
# (GPT-2's <|endoftext|> is bos, eos and unk at once: as a *prediction* it means "end").
SPECIAL_ROLES = ("eos", "bos", "unk", "pad")

_SPM_SPACE = "\u2581"  # "▁"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Normalizer types that change characters (not only whitespace), so that token strings
# are not substrings of the raw text (SPEC 3b: detect, do not assume).
_CHANGING_NORMALIZERS = {
    "Lowercase",
    "NFKC",
    "NFKD",
    "NFD",
    "StripAccents",
    "Nmt",
    "Precompiled",
}


@functools.cache
def byte_level_table() -> dict[str, int]:
    r"""Return the byte-level BPE alphabet: stand-in character -> byte value.

    GPT-2 shows the 188 printable Latin-1 bytes as themselves and moves the other 68 bytes
    (controls, space, ``\xad`` ...) to code points 256, 257, ... in byte order, so that no
    vocabulary string contains whitespace or control characters. ``Ġ`` (U+0120) is thus
    byte 0x20 (space) and ``Ċ`` (U+010A) is 0x0A.

    Returns:
        A dict of 256 entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


@dataclass(frozen=True)
class FamilyInfo:
    """What the backend JSON says about how a tokenizer spells text.

    Attributes:
        family: one of ``FAMILIES``.
        byte_fallback: ``<0xNN>`` pieces stand for raw bytes.
        subword_prefix: WordPiece continuation marker (usually ``##``), else ``""``.
        keeps_whitespace: tokens carry the text's whitespace (False for WordPiece, whose
            pre-tokenizer throws whitespace away).
        adds_prefix_space: the tokenizer prepends a space to the text (SentencePiece
            ``prepend_scheme``, byte-level ``add_prefix_space``), so the first token may
            hold a space that is not in the text.
        normalizers: types of the normalizers that rewrite characters (lower-casing,
            NFKC, accent stripping...). Non-empty means offsets map token strings onto
            text that reads differently.
    """

    family: str
    byte_fallback: bool = False
    subword_prefix: str = ""
    keeps_whitespace: bool = True
    adds_prefix_space: bool = False
    normalizers: tuple[str, ...] = ()


def _components(node: Any) -> list[dict]:
    """Flatten a (possibly nested ``Sequence``) pipeline component into its parts."""
    if not isinstance(node, dict):
        return []
    out = [node]
    for key in ("pretokenizers", "decoders", "normalizers", "processors"):
        for child in node.get(key) or []:
            out.extend(_components(child))
    return out


def detect_family(backend: dict) -> FamilyInfo:
    """Classify a tokenizer from its backend JSON (``tokenizers.Tokenizer.to_str()``).

    Args:
        backend: the parsed JSON of the fast tokenizer.

    Returns:
        The ``FamilyInfo``. Unknown layouts are ``PLAIN``: pieces are taken literally.
    """
    model = backend.get("model") or {}
    pre = _components(backend.get("pre_tokenizer"))
    dec = _components(backend.get("decoder"))
    norm = _components(backend.get("normalizer"))
    types = {c.get("type") for c in pre + dec}

    changing = []
    for c in norm:
        t = c.get("type")
        if t in _CHANGING_NORMALIZERS:
            changing.append(t)
        elif t == "BertNormalizer" and (c.get("lowercase") or c.get("strip_accents")):
            changing.append("BertNormalizer(lowercase/strip_accents)")

    if model.get("type") == "WordPiece" or "WordPiece" in types:
        prefix = model.get("continuing_subword_prefix") or "##"
        return FamilyInfo(
            WORDPIECE, subword_prefix=prefix, keeps_whitespace=False, normalizers=tuple(changing)
        )
    if "ByteLevel" in types:
        prefix = any(c.get("add_prefix_space") for c in pre if c.get("type") == "ByteLevel")
        return FamilyInfo(BYTE_LEVEL, adds_prefix_space=prefix, normalizers=tuple(changing))

    # SentencePiece: a Metaspace pre-tokenizer/decoder, or the older normalizer chain
    # Prepend("▁") + Replace(" ", "▁") with a Replace("▁", " ") decoder (Llama-2 HF).
    spm_replace = any(
        c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == _SPM_SPACE
        for c in dec
    ) or any(c.get("type") == "Replace" and c.get("content") == _SPM_SPACE for c in norm)
    if "Metaspace" in types or spm_replace:
        prefix = any(
            c.get("type") == "Metaspace"
            and (
                c.get("prepend_scheme", "always") in ("always", "first")
                or c.get("add_prefix_space")
            )
            for c in pre
        ) or any(c.get("type") == "Prepend" and c.get("prepend") == _SPM_SPACE for c in norm)
        fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
        return FamilyInfo(
            SENTENCEPIECE,
            byte_fallback=fallback,
            adds_prefix_space=prefix,
            normalizers=tuple(changing),
        )
    return FamilyInfo(
        PLAIN, byte_fallback=bool(model.get("byte_fallback")), normalizers=tuple(changing)
    )


def is_bert_punctuation(ch: str) -> bool:
    """BERT's punctuation test (its pre-tokenizer splits every such character off)."""
    # BERT's definition: ASCII symbol ranges plus every Unicode "P*" category.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(ch: str) -> bool:
    """A CJK ideograph (BERT puts spaces around each, making it a word of its own)."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def piece_surface(piece: str, info: FamilyInfo) -> tuple[bool, bytes]:
    """Decode one vocabulary piece into ``(word_start, content bytes)``.

    ``word_start`` means "this token normally follows a space": the piece starts with the
    family's word-start marker (``Ġ``/space byte, ``▁``) or, for WordPiece, it is not a
    ``##`` continuation and not a lone punctuation/CJK character (BERT splits those off
    without any space, so giving them one would make ``,`` match ``Ġ,`` instead of ``,``).
    ``content`` excludes that one marker space; the normalised form is
    ``b" " * word_start + content`` (see ``VocabSurface.form``).

    Args:
        piece: the vocabulary string.
        info: the tokenizer's ``FamilyInfo``.

    Returns:
        ``(word_start, content)``.
    """
    if info.family == BYTE_LEVEL:
        table = byte_level_table()
        if all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)
        else:  # an added token spelled in plain text
            raw = piece.encode("utf-8")
        if raw.startswith(b" "):
            return True, raw[1:]
        return False, raw
    if info.family == SENTENCEPIECE or (info.family == PLAIN and info.byte_fallback):
        m = _BYTE_FALLBACK.match(piece)
        if m and info.byte_fallback:
            raw = bytes([int(m.group(1), 16)])
        else:
            raw = piece.replace(_SPM_SPACE, " ").encode("utf-8")
        if raw.startswith(b" "):
            return True, raw[1:]
        return False, raw
    if info.family == WORDPIECE:
        prefix = info.subword_prefix
        if prefix and piece.startswith(prefix) and len(piece) > len(prefix):
            return False, piece[len(prefix) :].encode("utf-8")
        lone_symbol = len(piece) == 1 and (is_bert_punctuation(piece) or is_cjk(piece))
        return not lone_symbol, piece.encode("utf-8")
    raw = piece.encode("utf-8")
    if raw.startswith(b" "):
        return True, raw[1:]
    return False, raw


@dataclass(frozen=True, eq=False)
class VocabSurface:
    """Surface forms of every id of one tokenizer (including added tokens).

    Attributes:
        info: the tokenizer family.
        pieces: the raw vocabulary string per id (``""`` for ids the vocab skips).
        content: the bytes each token stands for, without the word-start space;
            ``b""`` for special tokens.
        word_start: (V,) bool, the token normally follows a space.
        special: (V,) bool, control tokens (BOS/EOS/PAD/UNK, chat markers, ids missing from
            the vocab) that carry no text.
        roles: special id -> tuple of roles from ``SPECIAL_ROLES``.
        unk_id: id of the unknown token or None.
        fingerprint: sha256 of the backend JSON and the roles (what a cache keys on).
    """

    info: FamilyInfo
    pieces: list[str]
    content: list[bytes]
    word_start: np.ndarray
    special: np.ndarray
    roles: dict[int, tuple[str, ...]]
    unk_id: int | None
    fingerprint: str
    _forms: list[bytes] = field(default_factory=list, repr=False)
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        """Number of ids (the source side of a ``VocabMap`` has exactly this length)."""
        return len(self.pieces)

    @property
    def forms(self) -> list[bytes]:
        """Normalised form per id: ``b" " * word_start + content`` (``b""`` if special)."""
        if not self._forms:
            self._forms.extend(
                b"" if s else (b" " + c if w else c)
                for c, w, s in zip(self.content, self.word_start, self.special, strict=True)
            )
        return self._forms

    def form(self, token_id: int) -> bytes:
        """Normalised form of one id (see ``forms``)."""
        return self.forms[token_id]

    def text_nbytes(self) -> np.ndarray:
        """(V,) int64: bytes of raw text a token covers (its form; WordPiece: content only)."""
        if "nbytes" not in self._cache:
            src = self.forms if self.info.keeps_whitespace else self.content
            self._cache["nbytes"] = np.fromiter((len(f) for f in src), np.int64, len(self))
        return self._cache["nbytes"]

    def is_unknown(self, ids: np.ndarray) -> np.ndarray:
        """Bool mask of ``ids`` that are the unknown token (text hidden by the tokenizer)."""
        ids = np.asarray(ids)
        if self.unk_id is None:
            return np.zeros(ids.shape, bool)
        return ids == self.unk_id


def to_text(b: bytes) -> str:
    """Bytes -> str for string algorithms; stray bytes of split characters survive.

    Invalid UTF-8 (half of a character, as byte-level BPE tokens can hold) becomes lone
    surrogates U+DC80..U+DCFF (``surrogateescape``), so ``<0xE6>`` and the byte-level
    token for 0xE6 give the same one-character string, and nothing is silently dropped.
    """
    return b.decode("utf-8", "surrogateescape")


def _backend(tok: Any):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or itself)."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None and hasattr(tok, "to_str"):
        backend = tok
    if backend is None:
        raise TypeError(
            f"{type(tok).__name__} has no fast (Rust) backend; load the tokenizer with "
            "use_fast=True (a tokenizer.json is needed for offsets and surface forms)"
        )
    return backend


def _roles(tok: Any) -> dict[int, tuple[str, ...]]:
    roles: dict[int, list[str]] = {}
    for role in SPECIAL_ROLES:
        tid = getattr(tok, f"{role}_token_id", None)
        if isinstance(tid, int) and tid >= 0:
            roles.setdefault(tid, []).append(role)
    return {k: tuple(v) for k, v in roles.items()}


_CACHE: dict[str, VocabSurface] = {}
# Per tokenizer object: serialising a 150k vocabulary to hash it costs ~0.1 s, too much
# to repeat for every block. Re-validated by the vocabulary size (added tokens change it).
_BY_OBJECT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget memoised surfaces (benchmarks measuring a cold start)."""
    _CACHE.clear()
    _BY_OBJECT.clear()


def vocab_surface(tok: Any) -> VocabSurface:
    """Compute (and memoise by content) the surface forms of a tokenizer's vocabulary.

    Args:
        tok: a transformers fast tokenizer or a ``tokenizers.Tokenizer``.

    Returns:
        The ``VocabSurface`` (one entry per id up to the largest id, added tokens included).
    """
    backend = _backend(tok)
    size = backend.get_vocab_size(with_added_tokens=True)
    try:
        hit = _BY_OBJECT.get(tok)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None and hit[0] == size:
        return hit[1]
    surf = _vocab_surface(tok, backend)
    try:
        _BY_OBJECT[tok] = (size, surf)
    except TypeError:
        pass
    return surf


def _vocab_surface(tok: Any, backend: Any) -> VocabSurface:
    raw_json = backend.to_str()
    roles = _roles(tok)
    fp = hashlib.sha256(
        raw_json.encode("utf-8") + json.dumps(sorted(roles.items())).encode("utf-8")
    ).hexdigest()
    if fp in _CACHE:
        return _CACHE[fp]
    data = json.loads(raw_json)
    info = detect_family(data)

    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    pieces = [""] * size
    for piece, i in vocab.items():
        pieces[i] = piece
    special = np.zeros(size, bool)
    present = np.zeros(size, bool)
    present[list(vocab.values())] = True
    special[~present] = True  # holes in the id space carry no text
    for added in data.get("added_tokens") or []:
        # Added tokens flagged special are control tokens; added non-special tokens are
        # ordinary text the user added, spelled literally.
        if added.get("special", True):
            special[added["id"]] = True
    for extra in getattr(tok, "all_special_ids", None) or []:
        if 0 <= extra < size:
            special[extra] = True
    for tid in roles:
        if tid < size:
            special[tid] = True
    added_plain = {a["id"] for a in data.get("added_tokens") or [] if not a.get("special", True)}

    content: list[bytes] = []
    word_start = np.zeros(size, bool)
    for i, piece in enumerate(pieces):
        if special[i]:
            content.append(b"")
        elif i in added_plain:
            content.append(piece.encode("utf-8"))
        else:
            ws, c = piece_surface(piece, info)
            word_start[i] = ws
            content.append(c)
    unk = getattr(tok, "unk_token_id", None)
    surf = VocabSurface(
        info=info,
        pieces=pieces,
        content=content,
        word_start=word_start,
        special=special,
        roles={k: v for k, v in roles.items() if k < size},
        unk_id=unk if isinstance(unk, int) and 0 <= unk < size else None,
        fingerprint=fp,
    )
    _CACHE[fp] = surf
    return surf
