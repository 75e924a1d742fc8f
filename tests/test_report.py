from __future__ import annotations

import json

import pytest

from fuselm.artifacts import Stage, StageError
from fuselm.report import run_report, verdicts


def _results() -> dict:
    def m(kind, code, prose):
        return {
            "kind": kind,
            "overall": {"bits_per_byte": (code + prose) / 2},
            "domains": {"code": {"bits_per_byte": code}, "prose": {"bits_per_byte": prose}},
        }

    return {
        "blocks": 4,
        "models": {
            "tgt": m("target", 1.0, 2.0),
            "expert": m("source", 0.8, 2.2),
            "tgt-fused": m("fused", 0.9, 1.9),
            "tgt-control": m("control", 0.95, 1.85),
        },
    }


def test_verdicts_per_domain():
    v = {x["domain"]: x for x in verdicts(_results())}
    assert v["code"]["best_source"] == "expert" and v["code"]["beats_best_source"] is False
    assert v["code"]["beats_control"] is True
    assert v["prose"]["beats_control"] is False and v["prose"]["beats_best_source"] is True
    assert v["all"]["best_source"] == "tgt"


def test_verdicts_without_trained_models():
    res = _results()
    res["models"] = {k: r for k, r in res["models"].items() if r["kind"] in ("source", "target")}
    v = verdicts(res)[0]
    assert v["fused"] is None and v["beats_control"] is None


def test_report_writes_markdown_and_plots(tmp_path):
    st = Stage(tmp_path, "eval")
    st.begin({"x": 1}, {}, [])
    (st.path / "results.json").write_text(json.dumps(_results()))
    st.finish({})
    log = tmp_path / "train" / "fused" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(
        "\n".join(
            json.dumps({"step": i, "clm": 3 - i * 0.1, "fusion": 2 - i * 0.1}) for i in range(5)
        )
        + "\n{cut"
    )
    out = run_report(None, tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| code | 0.9000 | 0.9500 | expert | 0.8000 | **yes** | no |" in md
    assert "did not beat the best source" not in md or "beat the CLM-only control" in md
    for png in ("bits_per_byte.png", "training_curves.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert out["path"].endswith("report.md")


def test_report_needs_eval(tmp_path):
    with pytest.raises(StageError, match="run `fuselm eval` first"):
        run_report(None, tmp_path)


def test_report_command_takes_the_run_dir(tmp_path, capsys):
    from fuselm.artifacts import ensure_run_dir
    from fuselm.cli import main

    run_dir = tmp_path / "run"
    ensure_run_dir(run_dir)
    st = Stage(run_dir, "eval")
    st.begin({"x": 1}, {}, [])
    (st.path / "results.json").write_text(json.dumps(_results()))
    st.finish({})
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report" / "report.md").exists()
    assert "report.md" in capsys.readouterr().out
