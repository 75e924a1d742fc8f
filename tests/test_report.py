from __future__ import annotations

import json

import numpy as np
import pytest

from fuselm.artifacts import Stage, StageError
from fuselm.report import run_report, verdicts


def _results() -> dict:
    """Two domains of 20 blocks each; per-block NLLs drawn around each model's level."""
    rng = np.random.default_rng(0)
    domains = ["code"] * 20 + ["prose"] * 20
    nbytes = rng.integers(200, 400, 40)

    def m(kind, code, prose, noise=0.002):
        level = np.array([code] * 20 + [prose] * 20)
        nll = (level + rng.normal(0, noise, 40)) * np.log(2) * nbytes
        per = {"nll": nll.tolist(), "bytes": nbytes.tolist()}

        def bpb(sel):
            return float(nll[sel].sum() / nbytes[sel].sum() / np.log(2))

        sel = np.array(domains)
        return {
            "kind": kind,
            "overall": {"bits_per_byte": bpb(slice(None))},
            "domains": {d: {"bits_per_byte": bpb(sel == d)} for d in ("code", "prose")},
            "per_block": per,
        }

    return {
        "blocks": 40,
        "block_domains": domains,
        "models": {
            "tgt": m("target", 1.0, 2.0),
            "expert": m("source", 0.8, 2.2),
            "tgt-fused": m("fused", 0.9, 1.9),
            "tgt-control": m("control", 0.95, 1.85),
            "tgt-fused-2": m("pairwise", 0.9, 1.9),
        },
    }


def test_verdicts_per_domain_with_intervals():
    v = {x["domain"]: x for x in verdicts(_results())}
    assert v["code"]["best_source"] == "expert"
    assert v["code"]["vs_control"]["verdict"] == "better"
    assert v["code"]["vs_best_source"]["verdict"] == "worse"
    assert v["prose"]["vs_control"]["verdict"] == "worse"
    assert v["prose"]["vs_best_source"]["verdict"] == "better"
    lo, hi = v["code"]["vs_control"]["ci95"]
    assert lo < v["code"]["vs_control"]["diff"] < hi < 0


def test_a_difference_within_noise_is_inconclusive():
    res = _results()
    ctl = res["models"]["tgt-control"]
    fused = res["models"]["tgt-fused"]
    rng = np.random.default_rng(1)
    # Control = fused + noise far larger than their mean difference.
    nb = np.asarray(fused["per_block"]["bytes"])
    ctl["per_block"]["nll"] = (
        np.asarray(fused["per_block"]["nll"]) + rng.normal(0.0005, 0.05, 40) * nb
    ).tolist()
    v = {x["domain"]: x for x in verdicts(res)}
    assert v["all"]["vs_control"]["verdict"] == "inconclusive"


def test_verdicts_without_trained_models():
    res = _results()
    res["models"] = {k: r for k, r in res["models"].items() if r["kind"] in ("source", "target")}
    v = verdicts(res)[0]
    assert v["fused"] is None and v["vs_control"] is None


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
    code = next(x for x in md.splitlines() if x.startswith("| code |"))
    assert "**better**" in code.split("|")[4] and "**worse**" in code.split("|")[7]
    assert "Overall, fused vs the CLM-only control:" in md
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
