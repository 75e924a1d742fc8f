"""`fuselm train` end to end: prepare -> capture -> align -> train on tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fuselm.artifacts import Stage, StageError
from fuselm.cli import main
from fuselm.testing import FIXTURE_TEXTS
from fuselm.train.trainer import STOP_ENV, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TRAIN = {
    "max_steps": 4,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "seq_len": 32,
    "precision": "float32",
}


@pytest.fixture(scope="module")
def aligned(tiny_models, tmp_path_factory):
    """A run dir with prepare, capture and align done for target (bpe) + spm; its config."""
    root = tmp_path_factory.mktemp("train_e2e")
    data = root / "data"
    data.mkdir()
    for i, text in enumerate(FIXTURE_TEXTS):
        (data / f"doc{i}.txt").write_text(text * 2, encoding="utf-8")
    cfg = {
        "corpus": {"inputs": [{"path": str(data)}], "block_tokens": 40, "validation_fraction": 0.2},
        "target": {"model": str(tiny_models["bpe"]), "name": "tgt"},
        "sources": [{"model": str(tiny_models["spm"]), "name": "spm"}],
        "train": TRAIN,
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run = root / "aligned"
    for stage in ("prepare", "capture", "align"):
        assert main(["-q", stage, "-c", str(path), "-o", str(run)]) == 0
    return path, run


def fresh(aligned, tmp_path, name="run"):
    cfg, src = aligned
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return cfg, dst


def manifest(run, variant):
    return json.loads((run / "train" / variant / "manifest.json").read_text())


def log_lines(run, variant):
    text = (run / "train" / variant / "log.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def test_train_stage_end_to_end(aligned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, run = fresh(aligned, tmp_path)
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run)]) == 0
    fused, control = manifest(run, "fused"), manifest(run, "control")
    st = fused["stats"]
    assert st["steps"] == 4 and st["processes"] == 1 and st["global_batch"] == 2
    assert st["lambda"] == 0.5 and control["stats"]["lambda"] == 1.0  # the default recipe
    shares = st["fusion"]["selection_share"]
    assert set(shares) == {"tgt", "spm"} and sum(shares.values()) == pytest.approx(1, abs=1e-5)
    assert 0 <= st["fusion"]["fallback_share"] < 1
    assert st["final_fusion"] is not None and control["stats"]["final_fusion"] is None
    assert st["tokens"] > 0 and st["tokens"] == control["stats"]["tokens"]
    # Same rows in the same order: the control differs only by λ.
    assert [x["rows"] for x in log_lines(run, "fused")] == [
        x["rows"] for x in log_lines(run, "control")
    ]
    model_dir = run / "train" / "fused" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    card = (model_dir / "README.md").read_text()
    assert "`spm`" in card and "λ = 0.5" in card and "min_ce" in card
    assert "tail bucket True" in card and "gate `teacher_better`" in card
    from fuselm.config import load_config
    from fuselm.train.stage import current_components

    now = current_components(load_config(cfg), run, "fused")
    assert Stage(run, "train/fused").status(now).state == "done"
    changed = current_components(load_config(cfg, ["train.learning_rate=2e-3"]), run, "fused")
    assert Stage(run, "train/fused").status(changed).state == "stale"
    changed = current_components(load_config(cfg, ["train.learning_rate=2e-3"]), run, "control")
    assert Stage(run, "train/control").status(changed).state == "stale"

    # Rerun: skipped. Changed fusion config: the fused model is stale, the control is not.
    finished = fused["finished"]
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run)]) == 0
    assert manifest(run, "fused")["finished"] == finished
    args = ["-q", "train", "-c", str(cfg), "-o", str(run), "fuse.function=avg_ce"]
    assert main(args) == 1
    assert main([*args, "--force"]) == 0
    assert manifest(run, "fused")["components"]["fuse"]["function"] == "avg_ce"
    # The control's identity does not include the fusion settings.
    assert manifest(run, "control")["fingerprint"] == control["fingerprint"]


def test_stale_message_names_the_field(aligned, tmp_path, capsys):
    cfg, run = fresh(aligned, tmp_path)
    over = ["eval.control=false"]
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run), *over]) == 0
    assert not (run / "train" / "control").exists()
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run), "train.clm_weight=0.9", *over]) == 1
    assert "train.clm_weight: 0.5 -> 0.9" in capsys.readouterr().err


def test_resume_through_the_stage(aligned, tmp_path, monkeypatch):
    cfg, one = fresh(aligned, tmp_path, "one")
    _, two = fresh(aligned, tmp_path, "two")
    over = ["eval.control=false", "train.save_steps=1"]
    assert main(["-q", "train", "-c", str(cfg), "-o", str(one), *over]) == 0
    monkeypatch.setenv(STOP_ENV, "3")
    with pytest.raises(TrainingInterrupted):
        main(["-q", "train", "-c", str(cfg), "-o", str(two), *over])
    monkeypatch.delenv(STOP_ENV)
    assert Stage(two, "train/fused").status().state == "partial"
    assert main(["-q", "train", "-c", str(cfg), "-o", str(two), *over]) == 0
    assert manifest(two, "fused")["stats"]["resumed_from"] == 3
    wa = load_file(str(one / "train" / "fused" / "model" / "model.safetensors"))
    wb = load_file(str(two / "train" / "fused" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_refuses_alignment_for_another_target(aligned, tmp_path, capsys):
    cfg, run = fresh(aligned, tmp_path)
    path = run / "align" / "spm" / "manifest.json"
    man = json.loads(path.read_text())
    man["components"]["target"] = {"tokenizer": "0123abcd", "bos": "auto"}
    path.write_text(json.dumps(man))
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run)]) == 1
    err = capsys.readouterr().err
    assert "'spm' was aligned for a target vocabulary" in err and "0123abcd" in err


def test_alignment_without_the_tail_is_refused(aligned, tmp_path, capsys):
    # An alignment written by an older fuselm (align format 1: no tail mass).
    cfg, run = fresh(aligned, tmp_path)
    path = run / "align" / "spm" / "manifest.json"
    man = json.loads(path.read_text())
    man["components"]["format"] = 1
    path.write_text(json.dumps(man))
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run), "train.tail_bucket=true"]) == 1
    err = capsys.readouterr().err
    assert "align/spm was written in align format 1" in err and "fuselm align --force" in err


def test_tail_aware_gated_run_logs_its_diagnostics(aligned, tmp_path):
    cfg, run = fresh(aligned, tmp_path)
    over = [
        "train.tail_bucket=true",
        "train.temperature=2.0",
        "train.clm_weight=0.5",
        "train.loss_weighting=grad_balanced",
        "fuse.gate=teacher_better",
        "eval.control=false",
    ]
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run), *over]) == 0
    lines = log_lines(run, "fused")
    for x in lines:
        assert 0.0 < x["lam"] < 1.0  # balanced every step
        assert x["teacher_gold_nll"] >= 0 and x["student_gold_nll"] > 0
        assert 0.0 <= x["gold_outside"] <= 1.0 and 0.0 <= x["tail_mass"] <= 1.0
        assert set(x["led_by"]) <= {"tgt", "spm", "gold"}
        assert sum(x["led_by"].values()) == pytest.approx(1.0, abs=1e-3)
    diag = manifest(run, "fused")["stats"]["fusion"]["diagnostics_by_domain"]
    (d,) = diag.values()
    assert d["teacher_bits_per_byte"] <= d["target_bits_per_byte"]  # MinCE never picks worse
    assert 0.0 <= d["gated_share"] <= 1.0


def test_missing_alignment(aligned, tmp_path):
    from fuselm.config import load_config
    from fuselm.train.stage import run_train

    cfg, run = fresh(aligned, tmp_path)
    shutil.rmtree(run / "align" / "spm")
    with pytest.raises(StageError, match="align/spm is not finished"):
        run_train(load_config(cfg), run)


def test_torchrun_two_processes_train_the_same_run(aligned, tmp_path):
    """2 CPU processes (gloo) with batch 1 each == 1 process with batch 2."""
    cfg, one = fresh(aligned, tmp_path, "one")
    _, two = fresh(aligned, tmp_path, "two")
    over = ["eval.control=false"]
    assert main(["-q", "train", "-c", str(cfg), "-o", str(one), *over]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", STOP_ENV):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "fuselm", "-q", "train", "-c", str(cfg), "-o", str(two), *over]
    cmd += ["train.batch_size=1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    st1, st2 = manifest(one, "fused")["stats"], manifest(two, "fused")["stats"]
    assert st2["processes"] == 2 and st2["global_batch"] == st1["global_batch"] == 2
    assert st2["steps"] == st1["steps"] and st2["tokens"] == st1["tokens"]
    l1, l2 = log_lines(one, "fused"), log_lines(two, "fused")
    assert [x["rows"] for x in l1] == [x["rows"] for x in l2]
    for a, b in zip(l1, l2, strict=True):
        assert a["clm"] == pytest.approx(b["clm"], rel=1e-4)
        assert a["fusion"] == pytest.approx(b["fusion"], rel=1e-4)
    wa = load_file(str(one / "train" / "fused" / "model" / "model.safetensors"))
    wb = load_file(str(two / "train" / "fused" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=5e-5)


def test_rows_longer_than_the_target_context_are_refused(aligned, tmp_path, capsys):
    cfg, run = fresh(aligned, tmp_path)
    assert main(["-q", "train", "-c", str(cfg), "-o", str(run), "target.max_context=8"]) == 1
    assert "exceed the target's context of 8" in capsys.readouterr().err
