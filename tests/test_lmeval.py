"""The lm-evaluation-harness bridge: offline local tasks on already-loaded tiny models."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import yaml

from fuselm.lmeval import LmEvalError, run_lm_eval, staged_include

TASKS = Path(__file__).parent / "data" / "lmeval"
TASK = "fuselm_tiny_mc"


def _need_lm_eval() -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (fuselm[lmeval])")


@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _need_lm_eval()
    path = tiny_models["bpe"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_local_task_runs_in_process_and_gives_an_accuracy(tiny_lm):
    model, tok = tiny_lm
    pad_before = tok.pad_token
    res = run_lm_eval(model, tok, [TASK], str(TASKS), limit=None, batch_size=4)
    assert set(res) == {TASK}
    assert 0.0 <= res[TASK]["acc"] <= 1.0
    assert res[TASK]["acc"] * 8 == pytest.approx(round(res[TASK]["acc"] * 8))  # 8 questions
    assert "acc_stderr" in res[TASK]
    assert tok.pad_token == pad_before  # HFLM got a copy of the tokenizer
    # limit: fewer documents, still a valid accuracy on a multiple of 1/2
    few = run_lm_eval(model, tok, [TASK], TASKS, limit=2, batch_size=2)
    assert few[TASK]["acc"] in (0.0, 0.5, 1.0)


def test_relative_data_paths_resolve_against_the_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path must not depend on the working directory
    with staged_include(TASKS) as staged:
        cfg = yaml.safe_load((staged / f"{TASK}.yaml").read_text())
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data == (TASKS / f"{TASK}.jsonl").resolve()
        assert (staged / f"{TASK}.jsonl").is_symlink()  # data is linked, not copied
    assert not staged.exists()
    # the original YAML is untouched
    assert "data_files:\n    test: fuselm_tiny_mc.jsonl" in (TASKS / f"{TASK}.yaml").read_text()


def test_function_tags_survive_staging(tmp_path):
    (tmp_path / "utils.py").write_text("def text(doc):\n    return doc['q']\n")
    (tmp_path / "t.yaml").write_text(
        "task: tagged\ndataset_path: json\ndataset_kwargs:\n  data_files: d.jsonl\n"
        "doc_to_text: !function utils.text\n"
    )
    with staged_include(tmp_path) as staged:
        text = (staged / "t.yaml").read_text()
        assert "!function" in text and "utils.text" in text
        assert str(tmp_path.resolve() / "d.jsonl") in text
        assert (staged / "utils.py").exists()


def test_missing_lm_eval_gives_the_install_hint(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(LmEvalError, match=r"pip install 'fuselm\[lmeval\]'"):
        run_lm_eval(object(), object(), [TASK], None, None, 1)


def test_unknown_task_lists_where_it_looked(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(LmEvalError) as e:
        run_lm_eval(model, tok, ["fuselm_tiny_mcq"], str(TASKS), None, 1)
    msg = str(e.value)
    assert "fuselm_tiny_mcq" in msg and "built-in tasks" in msg
    assert str(TASKS.resolve()) in msg and "did you mean fuselm_tiny_mc" in msg
    with pytest.raises(LmEvalError, match="no eval.lm_eval_include"):
        run_lm_eval(model, tok, [TASK], None, None, 1)


def test_task_without_offline_data_is_named(tiny_lm, tmp_path):
    model, tok = tiny_lm
    (tmp_path / "hub.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "needs_the_hub",
                "dataset_path": "fuselm-test/not-a-local-dataset",
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{q}}",
                "doc_to_choice": "{{c}}",
                "doc_to_target": 0,
            }
        )
    )
    with pytest.raises(LmEvalError) as e:
        run_lm_eval(model, tok, ["needs_the_hub"], tmp_path, None, 1)
    msg = str(e.value)
    assert "'needs_the_hub'" in msg and "not available offline" in msg
    assert "dataset_path: json" in msg and "data_files" in msg


def test_include_must_be_a_folder(tiny_lm, tmp_path):
    model, tok = tiny_lm
    with pytest.raises(LmEvalError, match="is not a folder"):
        run_lm_eval(model, tok, [TASK], tmp_path / "nope", None, 1)


def test_eval_stage_stores_lm_eval_scores(base_config, write_config, tmp_path):
    from fuselm.cli import main
    from fuselm.config import load_config
    from fuselm.evaluate import run_eval

    _need_lm_eval()
    cfg_path = write_config(dict(base_config, eval={"lm_eval_tasks": [TASK]}))
    run_dir = tmp_path / "run"
    for stage in ("prepare", "capture"):
        assert main([stage, "-c", str(cfg_path), "-o", str(run_dir)]) == 0, stage
    cfg = load_config(cfg_path)
    # not yet config fields: the stage reads them with getattr
    object.__setattr__(cfg.eval, "lm_eval_include", str(TASKS))
    object.__setattr__(cfg.eval, "lm_eval_limit", 4)
    run_eval(cfg, run_dir)
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    target = cfg.target.resolved_name()
    assert set(res["lm_eval"]) == {target}
    assert res["lm_eval"][target][TASK]["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
