"""`fuselm run` end to end on the tiny fixtures: artifacts, skip on rerun, shard-level repair."""

from __future__ import annotations

import json

from fuselm.artifacts import Stage
from fuselm.cli import main
from fuselm.testing import TINY_RUN_STAGES

STAGE_DIRS = list(TINY_RUN_STAGES)


def _mtimes(run_dir):
    return {
        str(p.relative_to(run_dir)): p.stat().st_mtime_ns
        for p in run_dir.rglob("*")
        if p.is_file()
        and p.suffix in (".parquet", ".json", ".safetensors")
        and "report" not in p.parts  # the report is cheap and always rewritten
    }


def test_run_end_to_end_skip_and_repair(base_config, write_config, tmp_path, capsys):
    cfg = dict(base_config, sources=base_config["sources"][:1])  # target + one spm source
    cfg_path = write_config(cfg)
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg_path), "-o", str(run_dir)]) == 0
    for name in STAGE_DIRS:
        assert Stage(run_dir, name).manifest() is not None, name
    for png in ("bits_per_byte.png", "training_curves.png"):
        assert (run_dir / "report" / png).stat().st_size > 2000
    report = (run_dir / "report" / "report.md").read_text()
    assert "Did fusion help?" in report and "Selection share per domain" in report
    shares = Stage(run_dir, "train/fused").manifest()["stats"]["fusion"]
    for dom_shares in shares["selection_share_by_domain"].values():
        assert abs(sum(dom_shares.values()) - 1.0) < 1e-3
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert {r["kind"] for r in results["models"].values()} == {
        "target",
        "source",
        "fused",
        "control",
    }

    # rerun: every stage skipped, nothing rewritten
    before = _mtimes(run_dir)
    assert main(["run", str(cfg_path), "-o", str(run_dir)]) == 0
    assert _mtimes(run_dir) == before

    # delete one capture shard: only that shard is recaptured (byte-identical), so nothing
    # downstream changes and nothing downstream is redone
    shard = sorted((run_dir / "capture" / "spm").glob("*.parquet"))[0]
    content = shard.read_bytes()
    shard.unlink()
    capsys.readouterr()
    assert main(["run", str(cfg_path), "-o", str(run_dir)]) == 0
    assert shard.read_bytes() == content
    after = _mtimes(run_dir)
    changed = {k for k in after if after[k] != before.get(k)}
    assert str(shard.relative_to(run_dir)) in changed
    assert all(k.startswith("capture/spm/") for k in changed), changed


def test_run_with_heldout_curves_and_tensorboard(base_config, write_config, tmp_path):
    """`train.eval_every` + `report_to: tensorboard`: held-out bits per byte during training
    for the fused target and the control, in the log, TensorBoard's event files (read back,
    no network) and the report's curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = dict(base_config["train"], max_steps=4, eval_every=2, eval_blocks=4)
    cfg = dict(base_config, sources=base_config["sources"][:1], train=train)
    cfg["train"]["report_to"] = ["tensorboard"]
    run_dir = tmp_path / "run"
    assert main(["-q", "run", str(write_config(cfg)), "-o", str(run_dir)]) == 0
    for variant in ("fused", "control"):
        lines = [
            json.loads(x)
            for x in (run_dir / "train" / variant / "log.jsonl").read_text().splitlines()
        ]
        points = [x for x in lines if "heldout_bpb" in x]
        assert [x["step"] for x in points] == [0, 2, 4]
        assert points[0]["heldout_bpb"]["all"] > 0
        events = list((run_dir / "train" / variant / "tracking").rglob("events.out.tfevents*"))
        assert events, f"no TensorBoard events for {variant}"
        tags = set()
        for e in events:
            acc = EventAccumulator(str(e))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        assert {"loss/clm", "lr", "heldout_bpb/all"} <= tags
        if variant == "fused":
            assert {"loss/fusion", "fusion/teacher_gold_nll"} <= tags
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Held-out bits per byte during training" in report
    assert (run_dir / "report" / "heldout_curves.png").stat().st_size > 2000
