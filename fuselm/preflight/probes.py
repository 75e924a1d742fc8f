r"""Tokenizer probes: how one tokenizer spells digits, whitespace, newlines and non-ASCII text.

Pure functions over a loaded fast tokenizer: no files, no models. Each probe encodes a
few fixed strings and classifies what it sees; ``compare_profiles`` then turns the
differences between a target and a source into warnings. Why these probes (SPEC 3b):
offsets alignment can only pair positions whose boundaries both tokenizers share, and
boundaries are lost exactly where the two disagree about

- **digits**: single digits (Llama-2, SmolLM2, Qwen2), left-aligned groups of up to three
  (Llama-3) or whatever merges BPE learned (GPT-2: ``1234567`` -> ``123|45|67``);
- **runs of spaces and tabs**: one token per space (GPT-2 on code) or merged runs;
- **newlines**: one token per newline or merged blank lines;
- **non-ASCII text**: whole characters, byte pieces (byte-level BPE and SentencePiece byte
  fallback split a character over several tokens; their inner boundaries are never
  shared with a tokenizer that keeps it whole) or ``[UNK]`` (the text is gone).

Counts are differences of token counts between two strings that differ only in the
probed feature (``x`` + 8 spaces + ``y`` against ``x y``), so the word pieces around the
feature cancel out. The classification thresholds are in ``_style``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fuselm.align import offsets_cover_text, vocab_surface
from fuselm.align.surface import VocabSurface

# Digits: one long number gives the split pattern; the others give the largest digit run.
DIGITS_TEXT = "7 42 2024 31415 1234567 3.14159 1,000,000 and 65536"
LONG_NUMBER = "1234567"

# Whitespace probes: (base, probed) pairs that differ by 7 spaces / 2 tabs / 2 newlines.
SPACES_INLINE = ("x y", "x" + " " * 8 + "y")
SPACES_INDENT = ("if x:\n return y\n", "if x:\n" + " " * 8 + "return y\n")
TABS = ("x\ty", "x\t\t\ty")
NEWLINES = ("x\ny", "x\n\n\ny")
NEWLINE_INDENT = "def f():\n    return 1\n"

# Non-ASCII: one string per script family that tokenizers treat differently.
NON_ASCII: dict[str, str] = {
    "latin_accents": "Café, naïve, résumé, façade, Ångström, Øresund",
    "cyrillic": "Привет, как дела? Москва и Санкт-Петербург",
    "cjk": "東京は日本の首都です。北京是中国的首都。",
    "hangul": "서울은 한국의 수도입니다",
    "emoji": "🙂🚀👍🏽 🇫🇷 ∑ x² ≤ ∞ →",
}

# A mixed text for round-trip and normalisation checks (and the sample when the config
# has no corpus).
MIXED_TEXT = (
    "Knowledge fusion trains one target model on the fused predictions of several source "
    "models. Café, naïve, résumé; 東京 and 서울; emoji 🙂👍🏽; numbers 12345 and 3.14159.\n\n"
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass Stack:\n"
    "\tdef push(self, x):\n\t\tself.items.append(x)  # O(1)\n"
    "In 2024, 1234567 people paid $89.99 each; ÉCOLE, Straße and ﬁnance (a ligature).\n"
)

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def encode(tok: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and character offsets of ``text`` without special tokens.

    Returns:
        ``(ids (n,) int64, offsets (n, 2) int64)``.
    """
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    return ids, offsets


def _count(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _extra(tok: Any, pair: tuple[str, str]) -> int:
    """Tokens added by the probed feature: count(probed) - count(base)."""
    return _count(tok, pair[1]) - _count(tok, pair[0])


def _style(extra: int, units: int, keeps_whitespace: bool) -> str:
    """Classify how ``units`` extra whitespace characters were tokenized.

    ``dropped`` (the tokenizer throws whitespace away: WordPiece), ``one_each`` (at least
    ~85% of a token per extra character), ``merged`` (at most 2 extra tokens for the
    whole run), else ``partly_merged``.
    """
    if not keeps_whitespace:
        return "dropped"
    if extra >= round(0.85 * units):
        return "one_each"
    if extra <= min(2, units - 1):
        return "merged"
    return "partly_merged"


def probe_digits(tok: Any) -> dict[str, Any]:
    """How numbers are split.

    Returns:
        ``style``: ``single`` (one digit per token), ``groups_of_3`` (``1234567`` as
        3+3+1 or 1+3+3, no token above 3 digits) or ``merged`` (learned merges, irregular);
        ``max_digits_per_token``; ``split`` of ``1234567`` (digits per token);
        ``tokens`` for the whole probe.
    """
    ids, off = encode(tok, DIGITS_TEXT)
    per_token = [sum(c.isdigit() for c in DIGITS_TEXT[s:e]) for s, e in off.tolist()]
    a = DIGITS_TEXT.index(LONG_NUMBER)
    b = a + len(LONG_NUMBER)
    split = []
    for s, e in off.tolist():
        if s < b and e > a:
            d = sum(c.isdigit() for c in DIGITS_TEXT[max(s, a) : min(e, b)])
            if d:
                split.append(d)
    top = max(per_token, default=0)
    if top <= 1:
        style = "single"
    elif top <= 3 and split in ([3, 3, 1], [1, 3, 3]):
        style = "groups_of_3"
    else:
        style = "merged"
    return {"style": style, "max_digits_per_token": top, "split": split, "tokens": len(ids)}


def probe_whitespace(tok: Any, surface: VocabSurface) -> dict[str, Any]:
    """How runs of spaces, tabs and newlines are tokenized.

    Returns:
        Per feature the extra tokens it costs and a style (see ``_style``):
        ``spaces`` (8 spaces instead of 1 between words, inline and as code indentation:
        the style is taken from the indentation, the case SPEC 3b is about), ``tabs``
        (3 tabs instead of 1), ``newlines`` (3 instead of 1), and whether one token holds
        a newline together with the indentation after it (``newline_joins_indent``), and
        whether a tab needs a byte-fallback piece (``tab_byte_fallback``).
    """
    keeps = surface.info.keeps_whitespace
    inline, indent = _extra(tok, SPACES_INLINE), _extra(tok, SPACES_INDENT)
    tabs, newlines = _extra(tok, TABS), _extra(tok, NEWLINES)
    ids, _ = encode(tok, NEWLINE_INDENT)
    forms = surface.forms
    joins = any(b"\n " in forms[i] for i in ids.tolist())
    tab_ids, _ = encode(tok, "x\ty")
    tab_fallback = any(
        surface.info.byte_fallback and _BYTE_PIECE.match(surface.pieces[i]) is not None
        for i in tab_ids.tolist()
    )
    return {
        "spaces": {
            "style": _style(max(inline, indent), 7, keeps),
            "extra_tokens_inline_7": inline,
            "extra_tokens_indent_7": indent,
        },
        "tabs": {"style": _style(tabs, 2, keeps), "extra_tokens_2": tabs},
        "newlines": {"style": _style(newlines, 2, keeps), "extra_tokens_2": newlines},
        "newline_joins_indent": bool(joins),
        "tab_byte_fallback": bool(tab_fallback),
    }


def _partial_char(form: bytes) -> bool:
    try:
        form.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def probe_non_ascii(tok: Any, surface: VocabSurface) -> dict[str, Any]:
    """How non-ASCII scripts are tokenized.

    Returns:
        ``style``: ``unk`` (some text becomes the unknown token: lost), ``byte_pieces``
        (tokens holding part of a UTF-8 character: byte-level BPE or byte fallback) or
        ``whole_chars``; ``bytes_per_token`` over all probes; per script ``tokens``,
        ``bytes_per_token``, ``unk``, ``byte_fallback`` (``<0xNN>`` pieces) and
        ``partial_chars`` (tokens that do not hold whole characters).
    """
    forms = surface.forms
    scripts: dict[str, Any] = {}
    tot_tokens = tot_bytes = tot_unk = tot_partial = tot_fallback = 0
    for name, text in NON_ASCII.items():
        ids, _ = encode(tok, text)
        n_bytes = len(text.encode("utf-8"))
        unk = int(surface.is_unknown(ids).sum())
        fallback = sum(
            1
            for i in ids.tolist()
            if surface.info.byte_fallback and _BYTE_PIECE.match(surface.pieces[i])
        )
        partial = sum(1 for i in ids.tolist() if forms[i] and _partial_char(forms[i]))
        scripts[name] = {
            "tokens": len(ids),
            "bytes_per_token": round(n_bytes / max(1, len(ids)), 3),
            "unk": unk,
            "byte_fallback": fallback,
            "partial_chars": partial,
        }
        tot_tokens += len(ids)
        tot_bytes += n_bytes
        tot_unk += unk
        tot_partial += partial
        tot_fallback += fallback
    if tot_unk:
        style = "unk"
    elif tot_partial:
        style = "byte_pieces"
    else:
        style = "whole_chars"
    return {
        "style": style,
        "bytes_per_token": round(tot_bytes / max(1, tot_tokens), 3),
        "unk": tot_unk,
        "byte_fallback": tot_fallback,
        "partial_chars": tot_partial,
        "scripts": scripts,
    }


def probe_specials(tok: Any, surface: VocabSurface, bos_policy: str = "auto") -> dict[str, Any]:
    """Special tokens and the BOS/EOS conventions of encoding.

    Args:
        tok: the tokenizer.
        surface: its ``VocabSurface``.
        bos_policy: the model's ``bos`` setting (``auto``/``add``/``none``): what the
            capture stage will really feed the model.

    Returns:
        ``bos``/``eos``/``unk``/``pad`` token strings (None when unset), whether encoding
        adds BOS / EOS by itself (``adds_bos``, ``adds_eos``), what the capture adds under
        the policy (``capture_adds_bos``), other special tokens added around a text
        (``other_added``, e.g. BERT's [CLS]/[SEP]), ``adds_prefix_space`` (a space the
        tokenizer puts before the text), ``control_tokens`` (ids without text) and
        ``chat_template``.
    """
    with_sp = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    adds_bos = bool(with_sp) and bos is not None and with_sp[0] == bos and plain[:1] != [bos]
    adds_eos = (
        len(with_sp) > len(plain) and eos is not None and with_sp[-1] == eos and plain[-1:] != [eos]
    )
    other = len(with_sp) - len(plain) - int(adds_bos) - int(adds_eos)
    if bos_policy == "add":
        capture_bos = bos is not None
    elif bos_policy == "none":
        capture_bos = False
    else:
        capture_bos = adds_bos
    return {
        "bos": tok.bos_token,
        "eos": tok.eos_token,
        "unk": tok.unk_token,
        "pad": tok.pad_token,
        "adds_bos": adds_bos,
        "adds_eos": bool(adds_eos),
        "other_added": max(0, other),
        "bos_policy": bos_policy,
        "capture_adds_bos": bool(capture_bos),
        "adds_prefix_space": surface.info.adds_prefix_space,
        "control_tokens": int(surface.special.sum()),
        "chat_template": bool(getattr(tok, "chat_template", None)),
    }


def roundtrip(tok: Any, text: str) -> bool:
    """Whether decoding the encoded text gives the text back exactly."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return out == text


def probe_normalisation(tok: Any, surface: VocabSurface) -> dict[str, Any]:
    """Does the tokenizer rewrite text (lower-casing, accents, NFKC, dropped whitespace)?

    Detected, not assumed (SPEC 3b): the backend's normalizers are read, and the mixed
    probe text is checked two ways, decode(encode(text)) == text and ``offsets_cover_text``
    (each token's surface form equals the text its offsets cut out).

    Returns:
        ``normalizers`` (the rewriting ones from the backend JSON), ``keeps_whitespace``,
        ``roundtrip``, ``offsets_cover_text``, an ``example`` mismatch (token text, raw
        text) or None, and ``rewrites_text``: the verdict (normalizers present, or the
        token surfaces do not match the text).
    """
    ids, off = encode(tok, MIXED_TEXT)
    covered, examples = offsets_cover_text(MIXED_TEXT, off, ids, surface)
    example = None
    if examples:
        _, tok_text, raw = examples[0]
        example = [tok_text, raw]
    normalizers = list(surface.info.normalizers)
    return {
        "normalizers": normalizers,
        "keeps_whitespace": surface.info.keeps_whitespace,
        "roundtrip": roundtrip(tok, MIXED_TEXT),
        "offsets_cover_text": bool(covered),
        "example": example,
        "rewrites_text": bool(normalizers) or not covered,
    }


def profile_tokenizer(tok: Any, bos_policy: str = "auto") -> dict[str, Any]:
    """Every probe of one tokenizer, as a JSON-ready dict.

    Args:
        tok: a fast tokenizer (transformers).
        bos_policy: the model's ``bos`` setting.

    Returns:
        ``family``, ``ids`` (id range incl. added tokens), ``specials``, ``digits``,
        ``whitespace``, ``non_ascii``, ``normalisation``.
    """
    surface = vocab_surface(tok)
    return {
        "family": surface.info.family,
        "byte_fallback": surface.info.byte_fallback,
        "ids": len(surface),
        "specials": probe_specials(tok, surface, bos_policy),
        "digits": probe_digits(tok),
        "whitespace": probe_whitespace(tok, surface),
        "non_ascii": probe_non_ascii(tok, surface),
        "normalisation": probe_normalisation(tok, surface),
    }


# --------------------------------------------------------------------------- the corpus side

_SPACE_RUN = re.compile(r" {2,}")
_NEWLINE_RUN = re.compile(r"\n{2,}")


def text_profile(texts: list[str]) -> dict[str, float]:
    """Shares of the sample's characters that the probes are about.

    Returns:
        ``digits``, ``space_runs`` (characters in runs of two or more spaces), ``tabs``,
        ``newline_runs`` (blank lines), ``non_ascii``: each a share of all characters.
    """
    n = sum(len(t) for t in texts) or 1
    digits = sum(sum(c.isdigit() for c in t) for t in texts)
    runs = sum(sum(len(m) for m in _SPACE_RUN.findall(t)) for t in texts)
    tabs = sum(t.count("\t") for t in texts)
    nl = sum(sum(len(m) for m in _NEWLINE_RUN.findall(t)) for t in texts)
    non_ascii = sum(sum(ord(c) > 127 for c in t) for t in texts)
    return {
        "digits": digits / n,
        "space_runs": runs / n,
        "tabs": tabs / n,
        "newline_runs": nl / n,
        "non_ascii": non_ascii / n,
    }


# A difference in a feature that covers less than this share of the sample's characters
# is reported as a note, not a warning: it cannot move coverage much on this corpus.
RELEVANT_SHARE = 0.001


def _finding(kind: str, message: str, share: float | None) -> dict[str, Any]:
    relevant = share is None or share >= RELEVANT_SHARE
    if share is not None:
        message += f" ({share:.2%} of the sample's characters)"
    return {"kind": kind, "severity": "warning" if relevant else "note", "message": message}


def compare_profiles(
    tgt: dict[str, Any],
    src: dict[str, Any],
    sample: dict[str, float] | None = None,
    tgt_name: str = "target",
    src_name: str = "source",
) -> list[dict[str, Any]]:
    """Differences between two tokenizer profiles that are known to cost alignment.

    Args:
        tgt: ``profile_tokenizer`` of the target.
        src: ``profile_tokenizer`` of the source.
        sample: ``text_profile`` of the corpus sample; a difference in a feature the
            sample hardly contains becomes a ``note`` instead of a ``warning``.
        tgt_name: the target's name, for messages.
        src_name: the source's name.

    Returns:
        ``[{"kind", "severity", "message"}, ...]``; kinds: ``digits``, ``spaces``,
        ``tabs``, ``newlines``, ``non_ascii``, ``unk``, ``normalisation``, ``whitespace``,
        ``bos``.
    """
    s = sample or {}
    out: list[dict[str, Any]] = []
    t_d, s_d = tgt["digits"], src["digits"]
    if t_d["style"] != s_d["style"]:
        single = "single" in (t_d["style"], s_d["style"])
        what = (
            "one side splits numbers into single digits, the other keeps multi-digit tokens"
            if single
            else "numbers are cut at different places"
        )
        out.append(
            _finding(
                "digits",
                f"{what}: {tgt_name} {t_d['style']} (1234567 -> {t_d['split']}), "
                f"{src_name} {s_d['style']} ({s_d['split']}); positions inside numbers get "
                "no teacher prediction and multi-digit teacher tokens map only by MinED",
                s.get("digits"),
            )
        )
    tw, sw = tgt["whitespace"], src["whitespace"]
    for feat, share_key, unit, why in (
        (
            "spaces",
            "space_runs",
            "runs of spaces (indentation)",
            "; on code this can cost about half of the shared boundaries (SPEC 3b)",
        ),
        ("tabs", "tabs", "runs of tabs", ""),
        ("newlines", "newline_runs", "blank lines", ""),
    ):
        a, b = tw[feat]["style"], sw[feat]["style"]
        if a != b and "dropped" not in (a, b):
            out.append(
                _finding(
                    feat,
                    f"{tgt_name} tokenizes {unit} {a.replace('_', ' ')}, {src_name} "
                    f"{b.replace('_', ' ')}: boundaries inside the runs are not shared{why}",
                    s.get(share_key),
                )
            )
    if tw["newline_joins_indent"] != sw["newline_joins_indent"]:
        joined = tgt_name if tw["newline_joins_indent"] else src_name
        out.append(
            _finding(
                "newlines",
                f"{joined} joins a newline and the indentation after it into one token, "
                "the other does not: positions at line starts differ",
                s.get("space_runs"),
            )
        )
    ta, sa = tgt["non_ascii"], src["non_ascii"]
    if ta["style"] != sa["style"] and "unk" not in (ta["style"], sa["style"]):
        pieces = tgt_name if ta["style"] == "byte_pieces" else src_name
        out.append(
            _finding(
                "non_ascii",
                f"{pieces} splits non-ASCII characters into byte pieces, the other keeps "
                "whole characters: boundaries inside characters are never shared",
                s.get("non_ascii"),
            )
        )
    for name, prof in ((tgt_name, tgt), (src_name, src)):
        if prof["non_ascii"]["unk"]:
            out.append(
                _finding(
                    "unk",
                    f"{name} turns some non-ASCII text into its unknown token "
                    f"({prof['non_ascii']['unk']} of the probe's tokens): that text is lost "
                    "to it",
                    s.get("non_ascii"),
                )
            )
        norm = prof["normalisation"]
        if norm["rewrites_text"]:
            how = ", ".join(norm["normalizers"]) or "token surfaces differ from the text"
            ex = (
                f" (e.g. {norm['example'][0]!r} for {norm['example'][1]!r})"
                if norm["example"]
                else ""
            )
            out.append(
                _finding(
                    "normalisation",
                    f"{name} normalises text ({how}){ex}: its tokens are not substrings of "
                    "the raw text, so the vocabulary map compares rewritten strings",
                    None,
                )
            )
        if not norm["keeps_whitespace"]:
            out.append(
                _finding(
                    "whitespace",
                    f"{name} drops whitespace (WordPiece): it predicts words without their "
                    "spaces, newlines and indentation",
                    None,
                )
            )
    tb, sb = tgt["specials"], src["specials"]
    if tb["capture_adds_bos"] != sb["capture_adds_bos"] or tb["bos"] != sb["bos"]:
        out.append(
            {
                "kind": "bos",
                "severity": "note",
                "message": (
                    f"BOS differs: {tgt_name} {_bos_text(tb)}, {src_name} {_bos_text(sb)}; "
                    "harmless for offsets alignment (a leading control token predicts the "
                    "first text token on both sides)"
                ),
            }
        )
    return out


def _bos_text(sp: dict[str, Any]) -> str:
    if sp["capture_adds_bos"]:
        return f"adds {sp['bos']}"
    return "adds no BOS" if sp["bos"] is None else f"has {sp['bos']} but does not add it"
