"""The fixtures every later stage relies on must really have their families' traits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuselm.testing import build_tokenizer


def _pieces(family: str, text: str) -> list[str]:
    tok = build_tokenizer(family)
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_byte_level_bpe_traits():
    pieces = _pieces("bpe", "the fox\n")
    assert any(p.startswith("Ġ") for p in pieces) and "Ċ" in "".join(pieces)
    tok = build_tokenizer("bpe")
    text = "Zebra ∑ 東京\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless


def test_sentencepiece_traits():
    tok = build_tokenizer("spm")
    pieces = _pieces("spm", "the fox Ж")
    assert pieces[0].startswith("▁")
    assert any(p.startswith("<0x") for p in pieces)  # byte fallback for an unseen char
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # adds BOS like Llama


def test_wordpiece_traits():
    assert any(p.startswith("##") for p in _pieces("wordpiece", "abracadabra"))
    assert _pieces("wordpiece", "The Café") != _pieces("wordpiece_lower", "The Café")
    assert all(p == p.lower() for p in _pieces("wordpiece_lower", "The CAFÉ"))


def test_deterministic_across_processes():
    """Fixtures must not change between runs (the tokenizers trainers can break ties
    differently in every process, which once made the WordPiece fixture drift)."""
    import subprocess
    import sys

    code = (
        "from fuselm.testing import build_tokenizer, FAMILIES\n"
        "import hashlib\n"
        "print(' '.join(hashlib.sha256(build_tokenizer(f).backend_tokenizer.to_str().encode())"
        ".hexdigest()[:12] for f in FAMILIES))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(outs) == 1, outs


def test_tiny_models_load_offline_and_run(tiny_models):
    for name, path in tiny_models.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = torch.tensor([tok("hello world")["input_ids"]])
        logits = model(ids).logits
        assert logits.shape[-1] == model.config.vocab_size
        if name == "padded":
            assert model.config.vocab_size > len(tok)  # embedding rows != tokenizer size
        else:
            assert model.config.vocab_size == len(tok)
