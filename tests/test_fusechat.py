"""FuseChat workflow on tiny models: pairwise fused targets, merge, eval and report."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from fuselm.cli import main
from fuselm.testing import FIXTURE_TEXTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _man(run, sub):
    return json.loads((run / sub / "manifest.json").read_text())


def test_pairwise_then_merge_eval_report(tiny_models, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(FIXTURE_TEXTS):
        (data / f"doc{i}.txt").write_text(text * 2, encoding="utf-8")
    cfg = {
        "corpus": {"inputs": [{"path": str(data)}], "block_tokens": 40, "validation_fraction": 0.4},
        "target": {"model": str(tiny_models["bpe"]), "name": "tgt"},
        "sources": [
            {"model": str(tiny_models["spm"]), "name": "spm"},
            {"model": str(tiny_models["padded"]), "name": "pad"},
        ],
        "fuse": {"mode": "both"},
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "seq_len": 32,
            "precision": "float32",
        },
        "eval": {"control": False},
        "merge": {"method": "sce"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run = tmp_path / "run"
    for stage in ("prepare", "capture", "align"):
        assert main(["-q", stage, "-c", str(path), "-o", str(run)]) == 0
    captured = {n: _man(run, f"capture/{n}")["finished"] for n in ("tgt", "spm", "pad")}
    aligned = {n: _man(run, f"align/{n}")["finished"] for n in ("tgt", "spm", "pad")}

    # `fuselm run`: skips what is done, trains, merges (pairwise mode), evaluates, reports.
    assert main(["-q", "run", str(path), "-o", str(run)]) == 0
    # N = 2 sources -> 2 pairwise targets, each fused from the pivot and one source.
    for src in ("spm", "pad"):
        man = _man(run, f"train/pair-{src}")
        assert man["components"]["teachers"] == ["tgt", src]
        assert set(man["components"]["align"]) == {"tgt", src}
        assert set(man["stats"]["fusion"]["selection_share"]) == {"tgt", src}
        assert (run / "train" / f"pair-{src}" / "model" / "config.json").exists()
    assert _man(run, "train/fused")["components"]["teachers"] == ["tgt", "spm", "pad"]
    # No capture or alignment was redone for the pairs.
    assert {n: _man(run, f"capture/{n}")["finished"] for n in captured} == captured
    assert {n: _man(run, f"align/{n}")["finished"] for n in aligned} == aligned

    merged = _man(run, "merge")
    assert merged["stats"]["models"] == 2 and merged["base"] == str(tiny_models["bpe"])
    capsys.readouterr()
    assert main(["status", str(run), "--config", str(path)]) == 0
    status = capsys.readouterr().out
    for sub in ("train/pair-spm", "train/pair-pad", "train/fused", "merge"):
        assert re.search(rf"{sub}\s+done", status), status
    res = json.loads((run / "eval" / "results.json").read_text())
    kinds = {n: r["kind"] for n, r in res["models"].items()}
    assert kinds["tgt-pair-spm"] == kinds["tgt-pair-pad"] == "pairwise"
    assert kinds["tgt-merged"] == "merged" and kinds["tgt-fused"] == "fused"
    report = (run / "report" / "report.md").read_text()
    assert "## Fuse-then-merge (FuseChat)" in report
    for name in (
        "tgt (target)",
        "tgt-pair-spm (pairwise)",
        "tgt-merged (merged)",
        "tgt-fused (fused)",
    ):
        assert name in report
    assert "The merged model (merged minus the other, bits per byte):" in report
    assert "- vs the pivot: " in report and "95% interval" in report

    # Streaming training data serves the pairwise variants too, each fusing its own pair.
    run2 = tmp_path / "run-stream"
    run2.mkdir()
    for part in ("fuselm-run.json", "prepare", "capture", "align"):
        src = run / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, run2 / part)
    args = ["-q", "train", "-c", str(path), "-o", str(run2), "train.streaming=true"]
    assert main([*args, "fuse.mode=pairwise"]) == 0
    for src in ("spm", "pad"):
        man = _man(run2, f"train/pair-{src}")
        assert man["components"]["teachers"] == ["tgt", src]
        assert set(man["stats"]["fusion"]["selection_share"]) == {"tgt", src}
    assert not (run2 / "train" / "fused").exists()


def test_pairwise_needs_sources(tiny_models, tmp_path):
    from fuselm.artifacts import StageError
    from fuselm.config import load_config
    from fuselm.train.variants import base_components, variant_names

    cfg = load_config(None, [f"target.model={tiny_models['bpe']}", "fuse.mode=pairwise"])
    assert variant_names(cfg) == ["control"]
    with pytest.raises(StageError, match="no sources"):
        base_components(cfg, tmp_path)


def test_multi_mode_run_skips_merge(tiny_models, tmp_path, write_config):
    from fuselm.cli import _merge_wanted
    from fuselm.config import load_config

    cfg = load_config(None, [f"target.model={tiny_models['bpe']}"])
    assert not _merge_wanted(cfg)
    assert _merge_wanted(load_config(None, ["fuse.mode=pairwise"]))
    assert _merge_wanted(load_config(None, ["merge.models=[a, b]"]))
