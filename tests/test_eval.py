from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuselm.artifacts import Stage, StageError
from fuselm.cli import main
from fuselm.evaluate.scoring import (
    BlockScore,
    aggregate,
    bits_per_byte,
    block_trace,
    capture_scores,
    own_scores,
    predicted_bytes,
    score_blocks,
    shared_scores,
)


def test_predicted_bytes_counts_what_was_predicted():
    text = "héllo world"
    offs = np.array([[0, 5], [5, 11]])
    assert predicted_bytes(text, np.array([1, 2]), offs) == len(b" world")
    with_bos = np.array([[0, 0], [0, 5], [5, 11]])
    assert predicted_bytes(text, np.array([9, 1, 2]), with_bos) == len(text.encode())
    assert predicted_bytes(text, np.array([1]), offs[:1]) == 0


def test_bos_convention_does_not_change_bits_per_byte():
    """Two models that differ only in BOS convention: the one with BOS also predicts the
    first token (costly, no context). Scored over the same bytes, their bits per byte are
    equal; counted from each one's own first prediction, they were not."""
    block = {"hash": "h", "domain": "d", "text": "The cat sat on the mat.\n"}
    offs = np.array([[0, 3], [3, 7], [7, 11], [11, 14], [14, 18], [18, 22], [22, 24]])
    gold = np.log([0.3, 0.5, 0.4, 0.6, 0.5, 0.9])  # tokens 2.. given the text before
    no_bos = block_trace(block, offs, gold)
    with_bos = block_trace(block, np.vstack([[0, 0], offs]), np.concatenate([[np.log(0.01)], gold]))
    own = aggregate(own_scores([no_bos]))["overall"], aggregate(own_scores([with_bos]))["overall"]
    assert own[0]["bits_per_byte"] != pytest.approx(own[1]["bits_per_byte"], rel=1e-3)
    shared = shared_scores({"a": [no_bos], "b": [with_bos]})
    a, b = shared["a"][0], shared["b"][0]
    assert (a.bytes, a.nll, a.tokens) == (b.bytes, b.nll, b.tokens) == (21, -gold.sum(), 6)
    # An EOS prediction after the text (0 bytes; only some tokenizers add it) is left out.
    eos = block_trace(block, np.vstack([offs, [[0, 0]]]), np.concatenate([gold, [np.log(0.2)]]))
    assert shared_scores({"a": [no_bos], "e": [eos]})["e"][0] == a
    # A tokenizer whose first token is longer: both start where both have a boundary.
    coarse = block_trace(block, np.array([[0, 7], [7, 14], [14, 24]]), np.log([0.2, 0.1]))
    out = shared_scores({"a": [no_bos], "c": [coarse]})
    assert out["a"][0].bytes == out["c"][0].bytes == len(b" sat on the mat.\n")
    assert out["a"][0].tokens == 5 and out["c"][0].tokens == 2


def test_aggregate_sums_then_divides():
    scores = [
        BlockScore("a", "code", nll=10.0, tokens=5, bytes=10),
        BlockScore("b", "code", nll=30.0, tokens=5, bytes=10),
        BlockScore("c", "prose", nll=8.0, tokens=4, bytes=40),
    ]
    agg = aggregate(scores, perplexity=True)
    assert agg["domains"]["code"]["bits_per_byte"] == pytest.approx(40 / 20 / math.log(2))
    assert agg["overall"]["bits_per_byte"] == pytest.approx(48 / 60 / math.log(2))
    assert agg["overall"]["perplexity"] == pytest.approx(math.exp(48 / 14))
    assert math.isnan(bits_per_byte(1.0, 0))


@pytest.mark.parametrize("family", ["bpe", "spm"])
def test_score_blocks_equals_a_direct_forward(tiny_models, family):
    path = tiny_models[family]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog."]
    blocks = [
        {"block_id": f"d#{i}", "hash": f"h{i}", "domain": "d", "text": t}
        for i, t in enumerate(texts)
    ]
    scores = own_scores(score_blocks(model, tok, blocks, name=family))
    for s, text in zip(scores, texts, strict=True):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        assert s.tokens == ids.shape[1] - 1
        assert s.nll == pytest.approx(nll, abs=0.008 * s.tokens)  # capture's 1/64-nat grid


def _run(base_config, write_config, tmp_path, **eval_cfg):
    cfg = dict(base_config, eval={"control": False, **eval_cfg})
    cfg_path = write_config(cfg)
    run_dir = tmp_path / "run"
    for stage in ("prepare", "capture", "eval"):
        assert main([stage, "-c", str(cfg_path), "-o", str(run_dir)]) == 0, stage
    return cfg_path, run_dir


def test_eval_stage_end_to_end(base_config, write_config, tmp_path, capsys):
    cfg_path, run_dir = _run(base_config, write_config, tmp_path)
    out = capsys.readouterr().out
    assert "bits per byte" in out and "tgt" in out and "wp" in out
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(res["models"]) == {"tgt", "spm", "wp"}
    assert res["models"]["tgt"]["kind"] == "target"
    assert "perplexity" in res["models"]["tgt"]["overall"]  # shares the target's tokenizer
    assert "perplexity" not in res["models"]["spm"]["overall"]
    # WordPiece drops whitespace: flagged as not comparable
    assert res["models"]["wp"]["lossless_share"] < 1.0
    assert res["models"]["tgt"]["lossless_share"] == 1.0
    assert "wp*" in out and "optimistic" in out
    for r in res["models"].values():
        assert r["overall"]["bits_per_byte"] > 0 and r["overall"]["bytes"] > 0
        # overall = byte-weighted combination of the domains
        total = sum(d["nll_nats"] for d in r["domains"].values())
        assert total == pytest.approx(r["overall"]["nll_nats"])
        # per-block scores, in block order, add up to the totals (the bootstrap's input)
        per = r["per_block"]
        assert len(per["nll"]) == len(res["block_domains"]) == res["blocks"]
        assert sum(per["nll"]) == pytest.approx(r["overall"]["nll_nats"], abs=1e-3)
        assert sum(per["bytes"]) == r["overall"]["bytes"]
    rows = list(csv.DictReader((run_dir / "eval" / "results.csv").open()))
    assert {(r["model"], r["domain"]) for r in rows} >= {("tgt", "all"), ("spm", "all")}
    # capture-based scores agree with running the model again
    from fuselm.corpus import read_blocks

    blocks = read_blocks(run_dir, "validation").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(base_config["target"]["model"]).eval()
    tok = AutoTokenizer.from_pretrained(base_config["target"]["model"])
    again = aggregate(own_scores(score_blocks(model, tok, blocks, name="tgt")))
    from_capture = aggregate(own_scores(capture_scores(run_dir, "tgt", blocks)))
    assert again["overall"]["bits_per_byte"] == pytest.approx(
        from_capture["overall"]["bits_per_byte"], rel=1e-3
    )
    # rerun: skipped
    assert main(["eval", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    assert Stage(run_dir, "eval").manifest()["stats"]["models"] == 3


def test_eval_needs_captures_and_a_validation_split(base_config, write_config, tmp_path, capsys):
    cfg_path = write_config(
        dict(base_config, corpus=dict(base_config["corpus"], validation_fraction=0.0))
    )
    run_dir = tmp_path / "run"
    main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)])
    with pytest.raises(StageError, match="validation split is empty"):
        from fuselm.config import load_config
        from fuselm.evaluate import run_eval

        run_eval(load_config(cfg_path), run_dir)
    cfg_path = write_config(base_config, "b.yaml")
    run_dir = tmp_path / "run2"
    main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)])
    capsys.readouterr()
    assert main(["eval", "-c", str(cfg_path), "-o", str(run_dir)]) == 1
    assert "run `fuselm capture` first" in capsys.readouterr().err


def test_paired_bootstrap_and_seed_verdicts():
    import numpy as np

    from fuselm.evaluate.compare import paired_bootstrap, seed_verdict

    rng = np.random.default_rng(0)
    doms = ["a"] * 30 + ["b"] * 10
    nb = rng.integers(100, 300, 40)
    base = rng.normal(1.0, 0.2, 40) * np.log(2) * nb  # per-block NLL in nats
    same = paired_bootstrap(base, nb, base, nb, doms)
    assert same["all"].diff == 0 and same["all"].verdict == "inconclusive"
    # 0.01 bits/byte better on every block of domain a only: a is better, b inconclusive.
    better = base - np.where(np.array(doms) == "a", 0.01 * np.log(2) * nb, 0.0)
    d = paired_bootstrap(better, nb, base, nb, doms)
    assert d["a"].verdict == "better" and d["a"].diff == pytest.approx(-0.01)
    assert d["b"].verdict == "inconclusive" and d["b"].blocks == 10
    assert d["all"].low <= d["all"].diff <= d["all"].high < 0
    # Reproducible: the resampling is seeded.
    assert paired_bootstrap(better, nb, base, nb, doms)["all"] == d["all"]
    with pytest.raises(ValueError, match="one value per block"):
        paired_bootstrap(base[:3], nb, base, nb, doms)
    assert seed_verdict([-0.03, -0.031, -0.029])[2] == "better"
    assert seed_verdict([-0.03, 0.02, -0.01])[2] == "inconclusive"
    assert seed_verdict([-0.03])[2] == "inconclusive"
    assert seed_verdict([0.01, 0.011, 0.012])[2] == "worse"
