"""Surface forms: family detection and normalisation of every vocabulary entry."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, models  # noqa: E402

from fuselm.align.surface import (  # noqa: E402
    BYTE_LEVEL,
    PLAIN,
    SENTENCEPIECE,
    WORDPIECE,
    byte_level_table,
    to_text,
    vocab_surface,
)
from fuselm.testing import FAMILIES, FIXTURE_TEXTS, build_tokenizer  # noqa: E402

TOKS = {f: build_tokenizer(f) for f in FAMILIES}
SURF = {f: vocab_surface(t) for f, t in TOKS.items()}


def form_of(family: str, piece: str) -> bytes:
    tok = TOKS[family]
    return SURF[family].form(tok.convert_tokens_to_ids(piece))


def test_family_detected_from_backend_json():
    assert SURF["bpe"].info.family == BYTE_LEVEL
    assert SURF["spm"].info.family == SENTENCEPIECE
    assert SURF["spm"].info.byte_fallback and SURF["spm"].info.adds_prefix_space
    assert SURF["wordpiece"].info.family == WORDPIECE
    assert not SURF["wordpiece"].info.keeps_whitespace
    assert SURF["wordpiece"].info.normalizers == ()
    assert SURF["wordpiece_lower"].info.normalizers  # lower-casing is reported
    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    assert vocab_surface(plain).info.family == PLAIN


def test_byte_level_table_is_a_bijection_with_known_anchors():
    table = byte_level_table()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["ĉ"] == 0x09
    assert table["!"] == ord("!") and table["Ã"] == 0xC3


def test_word_start_markers_normalise_to_one_form():
    # Ġthe (byte-level), ▁the (SentencePiece), the (WordPiece word start) are one text.
    assert form_of("bpe", "Ġthe") == form_of("spm", "▁the") == form_of("wordpiece", "the")
    assert form_of("bpe", "Ġthe") == b" the"
    # A WordPiece continuation has no space; nor does a lone punctuation mark.
    assert form_of("wordpiece", "##e") == form_of("bpe", "e") == b"e"
    assert form_of("wordpiece", ",") == form_of("bpe", ",") == b","
    assert not SURF["wordpiece"].word_start[TOKS["wordpiece"].convert_tokens_to_ids(",")]


def test_newline_forms_agree_across_families():
    assert form_of("bpe", "Ċ") == form_of("spm", "<0x0A>") == b"\n"
    assert form_of("bpe", "ĉ") == form_of("spm", "<0x09>") == b"\t"


def test_byte_level_pieces_decode_to_utf8_bytes():
    assert form_of("bpe", "Ã©") == "é".encode()
    # Half of a character survives as its raw byte, comparable to a byte-fallback token.
    assert form_of("bpe", "Ã") == b"\xc3" == form_of("spm", "<0xC3>")
    assert to_text(b"\xc3") == "\udcc3"


@pytest.mark.parametrize("family", ["bpe", "spm"])
def test_forms_reproduce_the_text_of_lossless_tokenizers(family):
    tok, surf = TOKS[family], SURF[family]
    for text in FIXTURE_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined = b"".join(surf.forms[i] for i in ids)
        if surf.info.adds_prefix_space and not text.startswith(" "):
            joined = joined[1:]  # the prepended "▁"
        assert joined == text.encode(), text


def test_special_tokens_carry_roles_and_no_text():
    spm = SURF["spm"]
    tok = TOKS["spm"]
    bos, eos, unk = tok.bos_token_id, tok.eos_token_id, tok.unk_token_id
    assert spm.special[[bos, eos, unk]].all()
    assert spm.roles[bos] == ("bos",) and spm.roles[eos] == ("eos",)
    assert spm.forms[bos] == b"" and spm.unk_id == unk
    # GPT-2 style: one token is bos and eos at once.
    bpe = SURF["bpe"]
    eot = TOKS["bpe"].convert_tokens_to_ids("<|endoftext|>")
    assert set(bpe.roles[eot]) == {"bos", "eos"}
    wp = SURF["wordpiece"]
    cls = TOKS["wordpiece"].convert_tokens_to_ids("[CLS]")
    assert wp.special[cls] and wp.is_unknown(np.array([wp.unk_id, cls])).tolist() == [True, False]


def test_surface_is_memoised_by_content():
    again = vocab_surface(build_tokenizer("bpe"))
    assert again is SURF["bpe"]
    assert SURF["bpe"].fingerprint != SURF["spm"].fingerprint
