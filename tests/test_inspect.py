"""`fuselm inspect`: pair diagnostics, probes, cost model, CLI contract (issue #9).

Fixture tokenizers of several families stand in for real ones; the families are chosen so
that each probe sees a difference: byte-level BPE (merged digits, merged space runs),
SentencePiece-style (one token per space), WordPiece (drops whitespace), lower-casing
WordPiece (normalises), a BPE with single-digit pre-tokenization, and a word-level
tokenizer that turns most text into [UNK] (a poor pair).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fuselm.align import build_vocab_map, vocab_surface
from fuselm.cli import main
from fuselm.config import load_config
from fuselm.preflight import EXIT_POOR, run_inspect
from fuselm.preflight.estimate import count_parameters, synthetic_bytes_per_position
from fuselm.preflight.pairs import mined_kinds
from fuselm.preflight.probes import compare_profiles, profile_tokenizer
from fuselm.preflight.report import to_json, to_text
from fuselm.preflight.sample import sample_corpus
from fuselm.testing import FIXTURE_TEXTS, build_tokenizer, save_tiny_model

TOP_KEYS = {
    "fuselm_inspect",
    "config",
    "target",
    "sample",
    "tokenizers",
    "models",
    "pairs",
    "cost",
    "measure",
    "thresholds",
    "verdict",
    "seconds",
}
PAIR_KEYS = {
    "source",
    "target",
    "identical_tokenizer",
    "vocab",
    "alignment",
    "mass",
    "mass_estimate",
    "mass_measured",
    "unmapped_examples",
    "findings",
    "checks",
    "verdict",
    "reasons",
    "errors",
}


def _digits_bpe():
    """Byte-level BPE that splits numbers into single digits (Llama-2/SmolLM2 style)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(FIXTURE_TEXTS) * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def _unk_words():
    """A word-level tokenizer that knows 12 words: most text becomes [UNK]."""
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "the", "def", "return", "self", "if", "in", "to", "of", "a", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def extra_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-models")
    return {
        "lower": save_tiny_model(root / "lower", build_tokenizer("wordpiece_lower")),
        "digits": save_tiny_model(root / "digits", _digits_bpe()),
        "unk": save_tiny_model(root / "unk", _unk_words()),
        "short": save_tiny_model(root / "short", build_tokenizer("bpe"), vocab_rows=500),
    }


@pytest.fixture
def cfg_for(base_config, write_config, tiny_models, extra_models):
    """Write a config with the bpe target and the given sources; return its path."""

    def make(*sources: str, **extra):
        paths = {**tiny_models, **extra_models}
        data = dict(
            base_config,
            sources=[{"model": str(paths[s]), "name": s} for s in sources],
            **extra,
        )
        return write_config(data)

    return make


@pytest.fixture
def report(cfg_for):
    path = cfg_for("padded", "spm", "lower", "digits")
    return run_inspect(load_config(path), sample=12, sample_chars=1500, config_path=str(path))


def _pair(report, source):
    return next(p for p in report["pairs"] if p["source"] == source)


def test_identical_tokenizers_are_a_good_pair(report):
    p = _pair(report, "padded")  # same bpe tokenizer as the target, padded embedding
    assert p["identical_tokenizer"]
    assert p["alignment"]["coverage"] == 1.0
    assert p["vocab"]["exact_share"] == 1.0
    assert p["mass"]["exact"] == 1.0 and p["mass"]["lost"] == 0.0
    assert p["verdict"] == "good" and p["reasons"] == []


def test_padded_vocabulary_is_detected(report):
    m = report["models"]["padded"]
    assert m["padded_vocab"] and m["embedding_rows"] == 640
    assert m["tokenizer_ids"] < 640 and not m["vocab_short"]
    assert not report["models"]["tgt"]["padded_vocab"]
    assert "padded vocabulary, 640 embedding rows" in to_text(report)


def test_embedding_smaller_than_the_tokenizer_is_an_error(cfg_for):
    rep = run_inspect(load_config(cfg_for("short")), sample=4, sample_chars=500)
    assert rep["models"]["short"]["vocab_short"]
    p = rep["pairs"][0]
    assert p["verdict"] == "poor" and "500 embedding rows" in p["reasons"][0]


def test_normalising_tokenizer_is_flagged(report):
    norm = report["tokenizers"]["lower"]["normalisation"]
    assert norm["rewrites_text"] and norm["normalizers"]
    assert not report["tokenizers"]["tgt"]["normalisation"]["rewrites_text"]
    p = _pair(report, "lower")
    assert any(f["kind"] == "normalisation" for f in p["findings"])
    assert any(c["name"] == "normalisation" for c in p["checks"])
    assert p["verdict"] in ("usable", "poor")  # capped: never good
    assert any(f["kind"] == "whitespace" for f in p["findings"])  # WordPiece drops it


def test_digit_and_whitespace_differences_warn(report):
    toks = report["tokenizers"]
    assert toks["digits"]["digits"]["style"] == "single"
    assert toks["tgt"]["digits"]["style"] != "single"
    kinds = {f["kind"]: f for f in _pair(report, "digits")["findings"]}
    assert kinds["digits"]["severity"] == "warning"  # the corpus has numbers
    assert (
        toks["spm"]["whitespace"]["spaces"]["style"] != toks["tgt"]["whitespace"]["spaces"]["style"]
    )
    spm = {f["kind"]: f for f in _pair(report, "spm")["findings"]}
    assert spm["spaces"]["severity"] == "warning"
    assert "digits" not in {f["kind"] for f in _pair(report, "padded")["findings"]}


def test_sample_without_the_feature_gives_a_note():
    tgt, src = profile_tokenizer(build_tokenizer("bpe")), profile_tokenizer(_digits_bpe())
    no_digits = {"digits": 0.0, "space_runs": 0.0, "tabs": 0.0, "newline_runs": 0.0, "non_ascii": 0}
    found = {f["kind"]: f for f in compare_profiles(tgt, src, no_digits)}
    assert found["digits"]["severity"] == "note"


def test_specials_and_bos_conventions(report):
    spm = report["tokenizers"]["spm"]["specials"]
    assert spm["bos"] == "<s>" and spm["adds_bos"] and spm["capture_adds_bos"]
    tgt = report["tokenizers"]["tgt"]["specials"]
    assert not tgt["adds_bos"]
    assert any(f["kind"] == "bos" for f in _pair(report, "spm")["findings"])
    na = report["tokenizers"]["tgt"]["non_ascii"]
    assert na["style"] == "byte_pieces" and na["partial_chars"] > 0


def test_mined_shares_match_the_real_mined_map():
    for src_f, tgt_f in (("spm", "bpe"), ("wordpiece", "bpe"), ("bpe", "wordpiece_lower")):
        src, tgt = vocab_surface(build_tokenizer(src_f)), vocab_surface(build_tokenizer(tgt_f))
        exact = build_vocab_map(src, tgt, "exact")
        assert np.array_equal(mined_kinds(exact, src), build_vocab_map(src, tgt, "mined").kind)


def test_cost_section(report, tiny_models):
    c = report["cost"]
    tgt = c["models"]["tgt"]
    assert tgt["tokens"] > 0 and tgt["tokens_basis"].startswith("sample")
    assert tgt["capture"]["bytes"] == pytest.approx(
        tgt["tokens"] * tgt["capture"]["bytes_per_position"]
    )
    assert (
        tgt["train"]["peak_memory"]["weights_grads_optimizer"]
        == 16 * report["models"]["tgt"]["parameters"]
    )
    assert c["totals"]["disk_bytes"] > 0 and c["assumptions"]
    spm = c["models"]["spm"]
    assert "train" not in spm
    # Aligned copies hold only target positions with a teacher prediction.
    cov = _pair(report, "spm")["alignment"]["coverage"]
    assert spm["align"]["bytes"] == pytest.approx(
        tgt["tokens"] * cov * spm["align"]["bytes_per_position"]
    )


def test_parameters_counted_exactly_without_weights(tiny_models):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_models["spm"]
    n, exact = count_parameters(AutoConfig.from_pretrained(path))
    real = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert exact and n == sum(p.numel() for p in real.parameters())


def test_synthetic_capture_bytes_stay_in_budget():
    tok = build_tokenizer("bpe")
    blocks = []
    for text in FIXTURE_TEXTS:
        enc = tok(text, return_offsets_mapping=True)
        blocks.append((np.array(enc["input_ids"]), np.array(enc["offset_mapping"])))
    bpp = synthetic_bytes_per_position(blocks, vocab_size=2**17, k=10)
    assert 10 < bpp <= 40  # issue #3 budget holds even for incompressible ids


def test_sample_spreads_over_files_and_cuts_documents(base_config, write_config):
    cfg = load_config(write_config(base_config))
    s = sample_corpus(cfg, n_docs=6, max_chars=300)
    assert len(s.texts) == 6 and max(map(len, s.texts)) <= 300
    assert set(s.domains) >= {"code"} and s.total_bytes > 0
    code = [d for d in s.doc_ids if d.startswith("0:")]
    assert len(code) == 3 and len(set(code)) == 3  # evenly from the 4 code files
    empty = sample_corpus(load_config(write_config(dict(base_config, corpus={"inputs": []}))))
    assert empty.origin == "builtin" and empty.total_bytes is None


def test_json_output_has_the_documented_keys(cfg_for, capsys):
    code = main(["inspect", "-c", str(cfg_for("spm")), "--json", "--sample", "6"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == TOP_KEYS
    assert data["fuselm_inspect"] == 1 and data["target"] == "tgt"
    assert set(data["pairs"][0]) == PAIR_KEYS
    assert {"coverage", "one_to_one_share"} <= set(data["pairs"][0]["alignment"])
    assert {"exact", "mined", "lost", "basis"} <= set(data["pairs"][0]["mass"])
    assert data["pairs"][0]["mass"]["basis"].startswith("estimate")


def test_text_output_is_tables(cfg_for, capsys):
    assert main(["inspect", "-c", str(cfg_for("spm")), "--sample", "6"]) == 0
    out = capsys.readouterr().out
    for heading in ("Tokenizers", "Pairs (source -> target)", "Cost for the full corpus"):
        assert heading in out
    assert "spm -> tgt" in out and "Verdict:" in out


def test_strict_exits_4_only_on_a_poor_pair(cfg_for, capsys):
    poor = cfg_for("unk")
    assert main(["inspect", "-c", str(poor), "--sample", "6", "--json"]) == 0
    pair = json.loads(capsys.readouterr().out)["pairs"][0]
    assert pair["verdict"] == "poor" and pair["mass"]["lost"] > 0.2
    assert main(["inspect", "-c", str(poor), "--sample", "6", "--strict"]) == EXIT_POOR
    assert main(["inspect", "-c", str(cfg_for("padded")), "--sample", "6", "--strict"]) == 0


def test_unloadable_source_is_a_poor_pair_not_a_crash(cfg_for, base_config, write_config, capsys):
    data = dict(base_config, sources=[{"model": "/nonexistent/model", "name": "ghost"}])
    code = main(["inspect", "-c", str(write_config(data)), "--sample", "4", "--json", "--strict"])
    assert code == EXIT_POOR
    pair = json.loads(capsys.readouterr().out)["pairs"][0]
    assert pair["verdict"] == "poor" and "could not be loaded" in pair["reasons"][0]


def test_bad_config_path_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "-c", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "does not exist" in err


def test_prepare_stats_give_exact_token_counts(cfg_for, tmp_path, capsys):
    from fuselm.artifacts import Stage

    path = cfg_for("spm")
    run_dir = tmp_path / "run"
    assert main(["prepare", "-c", str(path), "-o", str(run_dir)]) == 0
    stats = Stage(run_dir, "prepare").manifest()["stats"]["tokens"]
    capsys.readouterr()
    rep = run_inspect(load_config(path), sample=4, run_dir=run_dir)
    spm = rep["cost"]["models"]["spm"]
    assert spm["tokens_basis"].startswith("prepare stats")
    assert spm["tokens"] == stats["spm"]


def test_measure_and_throughput(cfg_for):
    path = cfg_for("spm", capture={"batch_tokens": 256})
    rep = run_inspect(load_config(path), sample=4, sample_chars=800, measure=True, throughput=1e4)
    p = rep["pairs"][0]
    meas = p["mass_measured"]
    assert meas["basis"].startswith("measured") and p["mass"] is meas
    assert meas["exact"] + meas["mined"] + meas["lost"] == pytest.approx(1.0)
    assert 0 < meas["topk_mass_mean"] <= 1.0 + 1e-6
    m = rep["measure"]
    assert m["spm"]["capture"]["tokens_per_second"] > 0 and "_topk" not in m["spm"]["capture"]
    assert m["tgt"]["train"]["tokens_per_second"] > 0
    tgt = rep["cost"]["models"]["tgt"]
    assert tgt["capture"]["seconds_measured"] > 0 and tgt["train"]["seconds_measured"] > 0
    # --throughput: the target's forward rate; training at a third of it.
    assert tgt["capture"]["seconds_throughput"] == pytest.approx(tgt["tokens"] / 1e4)
    assert tgt["train"]["seconds_throughput"] == pytest.approx(tgt["train"]["tokens"] * 3 / 1e4)
    assert json.loads(to_json(rep))["measure"]["spm"]["capture"]["bytes_per_position"] > 0
    # Teachers vs target on the same gold text, per domain, in the text report.
    for name in ("tgt", "spm"):
        bpb = m[name]["capture"]["bits_per_byte"]
        assert bpb["all"] > 0 and set(bpb) >= {"all"}
    text = to_text(rep)
    assert "Teachers vs target on the sample's gold text" in text
    t, s_ = m["tgt"]["capture"]["bits_per_byte"]["all"], m["spm"]["capture"]["bits_per_byte"]["all"]
    assert f"{s_:.4f} ({t - s_:+.4f})" in text
