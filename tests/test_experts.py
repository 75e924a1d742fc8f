"""Expert building: vocabulary transplant (FVT) and continual training, with their caches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuselm import experts
from fuselm.experts import (
    MARKER,
    ExpertError,
    continual_train,
    expert_info,
    fvt_sources,
    token_blocks,
    transplant_vocabulary,
)
from fuselm.testing import build_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def base_and_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    llama = save_tiny_model(root / "llama", build_tokenizer("bpe"), arch="llama")  # untied
    gpt2 = save_tiny_model(root / "gpt2", build_tokenizer("bpe"), arch="gpt2")  # tied
    spm = root / "spm-tok"
    build_tokenizer("spm").save_pretrained(spm)
    spm_small = root / "spm-small-tok"
    build_tokenizer("spm", vocab_size=400).save_pretrained(spm_small)
    return {"llama": llama, "gpt2": gpt2, "spm": spm, "spm_small": spm_small}


def _emb(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, model.get_input_embeddings().weight.detach()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transplant_shapes_and_fvt_means(base_and_tokenizers, tmp_path, arch):
    base = base_and_tokenizers[arch]
    out = transplant_vocabulary(base, base_and_tokenizers["spm"], tmp_path / "fvt")
    new_tok = AutoTokenizer.from_pretrained(out)
    base_tok = AutoTokenizer.from_pretrained(base)
    base_model, base_emb = _emb(base)
    model, emb = _emb(out)
    assert emb.shape == (len(new_tok), base_emb.shape[1])
    assert model.get_output_embeddings().weight.shape[0] == len(new_tok)
    tied = model.config.tie_word_embeddings
    assert tied == base_model.config.tie_word_embeddings
    assert model.config.eos_token_id == new_tok.eos_token_id
    # Every non-embedding weight is the base model's.
    base_sd, sd = base_model.state_dict(), model.state_dict()
    for k, v in base_sd.items():
        if v.shape[0] != base_emb.shape[0]:
            assert torch.equal(v, sd[k]), k
    # A word piece: its embedding is the mean of the base embeddings of the base tokens
    # its text encodes to (checked independently of fvt_sources).
    checked = 0
    for piece in ("▁the", "▁fox", "▁quick", "ing"):
        tid = new_tok.convert_tokens_to_ids(piece)
        if tid is None or tid == new_tok.unk_token_id:
            continue
        text = piece.replace("▁", " ")
        ids = base_tok(text, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(emb[tid], base_emb[ids].mean(0))
        if not tied:
            base_out = base_model.get_output_embeddings().weight.detach()
            out_w = model.get_output_embeddings().weight.detach()
            torch.testing.assert_close(out_w[tid], base_out[ids].mean(0))
        checked += 1
    assert checked >= 2
    # A byte-fallback token maps to the base's single-byte token.
    nl = new_tok.convert_tokens_to_ids("<0x0A>")
    nl_base = base_tok("\n", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(emb[nl], base_emb[nl_base].mean(0))
    stats = expert_info(out)["stats"]
    assert stats["exact"] > 0 and stats["split"] > 0
    assert sum(stats.values()) == len(new_tok)


def test_fvt_sources_special_tokens_by_role(base_and_tokenizers):
    base_tok = AutoTokenizer.from_pretrained(base_and_tokenizers["llama"])
    new_tok = AutoTokenizer.from_pretrained(base_and_tokenizers["spm"])
    rows, _ = fvt_sources(base_tok, new_tok)
    assert rows[new_tok.eos_token_id] == [base_tok.eos_token_id]
    assert rows[new_tok.unk_token_id] == []  # the base has no UNK: mean of all


def test_transplant_is_cached_and_rebuilt_on_change(base_and_tokenizers, tmp_path, monkeypatch):
    out = tmp_path / "fvt"
    transplant_vocabulary(base_and_tokenizers["llama"], base_and_tokenizers["spm"], out)
    first = expert_info(out)["fingerprint"]
    calls = []
    original = experts.fvt_sources
    monkeypatch.setattr(experts, "fvt_sources", lambda *a: calls.append(1) or original(*a))
    transplant_vocabulary(base_and_tokenizers["llama"], base_and_tokenizers["spm"], out)
    assert calls == []  # reused
    transplant_vocabulary(base_and_tokenizers["llama"], base_and_tokenizers["spm_small"], out)
    assert calls == [1]
    assert expert_info(out)["fingerprint"] != first
    assert len(AutoTokenizer.from_pretrained(out)) == len(
        AutoTokenizer.from_pretrained(base_and_tokenizers["spm_small"])
    )
    assert not list(tmp_path.glob(".fvt*"))  # no temporary or old folder left


def test_refuses_foreign_folder_and_bad_inputs(base_and_tokenizers, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExpertError, match="not built by fuselm"):
        transplant_vocabulary(base_and_tokenizers["llama"], base_and_tokenizers["spm"], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExpertError, match="no config.json"):
        transplant_vocabulary(tmp_path, base_and_tokenizers["spm"], tmp_path / "x")
    with pytest.raises(ExpertError, match="does not exist"):
        transplant_vocabulary(base_and_tokenizers["llama"], tmp_path / "nope", tmp_path / "x")
    with pytest.raises(ExpertError, match="no training data"):
        continual_train(base_and_tokenizers["llama"], [], tmp_path / "y", steps=1)
    with pytest.raises(ExpertError, match="positive"):
        continual_train(base_and_tokenizers["llama"], ["text"], tmp_path / "y", steps=0)


def test_token_blocks_packs_without_bos():
    tok = build_tokenizer("spm")  # adds <s> by default: packing must not
    rows = token_blocks(tok, ["The quick brown fox.", "The lazy dog sleeps."] * 4, 8)
    assert rows and all(len(r) == 8 for r in rows)
    flat = [t for r in rows for t in r]
    assert tok.bos_token_id not in flat
    assert tok.eos_token_id in flat
    with pytest.raises(ExpertError):
        token_blocks(tok, ["x"], 1)


def test_continual_train_learns_and_caches(base_and_tokenizers, tmp_path, monkeypatch):
    text = ["To be, or not to be, that is the question.\n" * 20]
    kw = dict(steps=12, seq_len=32, batch_size=2, lr=3e-3, seed=1)
    out = continual_train(base_and_tokenizers["llama"], text, tmp_path / "cl", **kw)
    info = expert_info(out)
    losses = info["losses"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learned the repeated line
    assert info["tokens_seen"] == 12 * 2 * 32
    AutoModelForCausalLM.from_pretrained(out)  # a loadable model
    assert AutoTokenizer.from_pretrained(out) is not None

    monkeypatch.setattr(
        experts, "token_blocks", lambda *a: pytest.fail("should have reused the cache")
    )
    continual_train(base_and_tokenizers["llama"], text, tmp_path / "cl", **kw)
    monkeypatch.undo()
    continual_train(base_and_tokenizers["llama"], text, tmp_path / "cl", **{**kw, "lr": 1e-3})
    changed = json.loads((out / MARKER).read_text())
    assert changed["fingerprint"] != info["fingerprint"]
    assert changed["components"]["lr"] == 1e-3


def test_continual_train_same_seed_same_weights(base_and_tokenizers, tmp_path):
    rows = [[5, 6, 7, 8, 9, 10, 11, 12]] * 3 + [[20, 21, 22, 23, 24, 25, 26, 27]]
    kw = dict(steps=3, batch_size=2, lr=1e-3, seed=7)
    a = continual_train(base_and_tokenizers["gpt2"], rows, tmp_path / "a", **kw)
    b = continual_train(base_and_tokenizers["gpt2"], rows, tmp_path / "b", **kw)
    wa, wb = _emb(a)[1], _emb(b)[1]
    assert torch.equal(wa, wb)
    assert expert_info(a)["losses"] == expert_info(b)["losses"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # tied and untied embeddings
def test_continual_train_stops_when_validation_stops_improving(base_and_tokenizers, tmp_path, arch):
    # Training text that is useless for the validation text: validation gets worse at a
    # large learning rate, so the run must stop early and keep the best (earliest) weights.
    train = [[5, 6, 7, 8, 9, 10, 11, 12] * 4] * 8
    val = [[30, 41, 17, 22, 9, 35, 28, 13] * 4] * 2
    kw = dict(steps=40, batch_size=2, lr=3e-2, seed=0)
    out = continual_train(
        base_and_tokenizers[arch], train, tmp_path / "es", validation=val, eval_every=2,
        patience=2, **kw,
    )  # fmt: skip
    info = expert_info(out)
    curve = info["validation"]
    assert curve[0]["step"] == 0 and len(info["losses"]) < 40  # stopped before the end
    best = min(curve, key=lambda c: c["loss"])
    assert best.get("best") == 1
    # The saved weights are the best measurement's: their validation loss matches it.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor(val)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss == pytest.approx(best["loss"], abs=1e-3)
    with pytest.raises(ExpertError, match="needs both validation data and eval_every"):
        continual_train(base_and_tokenizers[arch], train, tmp_path / "x", validation=val, **kw)
