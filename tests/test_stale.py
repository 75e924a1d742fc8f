"""Changed inputs: an edit after a finished run marks exactly the affected stages stale in
`fuselm status`, and `fuselm run` refuses to reuse any of them (naming what changed)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from fuselm.cli import main
from fuselm.testing import TINY_RUN_STAGES

ALL = set(TINY_RUN_STAGES)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models):
    """A finished run over private copies of the corpus and models (the tests edit them)."""
    import sysconfig

    root = tmp_path_factory.mktemp("stale")
    for key in ("bpe", "spm"):
        shutil.copytree(tiny_models[key], root / "models" / key)
    data = root / "data"
    data.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copy(stdlib / "colorsys.py", data / "colorsys.py")
    docs = [
        json.dumps({"text": f"Document {i}.\n" + "Café au lait, 12345.\n" * (i + 2)})
        for i in range(8)
    ]
    (data / "docs.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    cfg = {
        "corpus": {
            "inputs": [{"path": str(data / "colorsys.py")}, {"path": str(data / "docs.jsonl")}],
            "block_tokens": 100,
            "validation_fraction": 0.25,
        },
        "target": {"model": str(root / "models" / "bpe"), "name": "tgt"},
        "sources": [{"model": str(root / "models" / "spm"), "name": "spm"}],
        "train": {"max_steps": 2, "seq_len": 100, "batch_size": 2},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run_dir = root / "run"
    assert main(["-q", "run", str(path), "-o", str(run_dir)]) == 0
    return {"root": root, "cfg": path, "run": run_dir}


def _status(finished, capsys, *overrides: str) -> dict[str, str]:
    capsys.readouterr()
    assert main(["status", str(finished["run"]), "-c", str(finished["cfg"]), *overrides]) == 0
    out = capsys.readouterr().out
    return dict(re.findall(r"^  (\S+)\s+(done|partial|missing|stale)", out, re.M))


def _edit_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    key = sorted(sd)[0]
    sd[key] = sd[key] + 0.01
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def _edit_tokenizer(path: Path) -> None:
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    tok["normalizer"] = {"type": "NFKC"}
    (path / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")


def _edit_corpus(root: Path) -> None:
    with open(root / "data" / "docs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "One more document, added later."}) + "\n")


FIT = {"train/fused", "eval", "report"}  # what a fusion-only change reaches
CASES = {
    # an edited corpus changes every block: everything downstream
    "corpus": (lambda r: _edit_corpus(r), (), ALL),
    # a source's weights: its capture and alignment, the fused model, eval, report; not the
    # prepare stage (block sizes depend on tokenizers and contexts), not the control
    "source-weights": (
        lambda r: _edit_weights(r / "models" / "spm"),
        (),
        {"capture/spm", "align/spm"} | FIT,
    ),
    # the target's weights: it is also source #0, so its capture, every alignment onto it
    # (they record the target's capture), both trained models, eval, report
    "target-weights": (
        lambda r: _edit_weights(r / "models" / "bpe"),
        (),
        ALL - {"prepare", "capture/spm"},
    ),
    # a tokenizer: blocks must fit every tokenizer, so prepare and everything after it
    "source-tokenizer": (lambda r: _edit_tokenizer(r / "models" / "spm"), (), ALL),
    "fuse-function": (lambda r: None, ("fuse.function=avg_ce",), FIT),
    "learning-rate": (lambda r: None, ("train.learning_rate=2e-5",), FIT | {"train/control"}),
    "top-k": (
        lambda r: None,
        ("capture.top_k=5",),
        {"capture/tgt", "capture/spm", "align/tgt", "align/spm"} | FIT,
    ),
    "align-vocab": (lambda r: None, ("align.vocab=exact",), {"align/spm"} | FIT),
    "eval-blocks": (lambda r: None, ("eval.max_blocks=1",), {"eval", "report"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edit_marks_exactly_the_affected_stages_stale(case, finished, capsys):
    edit, overrides, expected = CASES[case]
    root = finished["root"]
    backup = root.parent / f"{root.name}-backup"
    shutil.rmtree(backup, ignore_errors=True)
    shutil.copytree(root / "models", backup / "models")
    shutil.copytree(root / "data", backup / "data")
    assert set(_status(finished, capsys).values()) == {"done"}
    try:
        edit(root)
        states = _status(finished, capsys, *overrides)
        assert set(states) == ALL
        assert {s for s, st in states.items() if st == "stale"} == expected, states
        assert all(st == "done" for s, st in states.items() if s not in expected), states
        # nothing stale is reused silently: the run stops at the first stale stage
        capsys.readouterr()
        code = main(["-q", "run", str(finished["cfg"]), "-o", str(finished["run"]), *overrides])
        err = capsys.readouterr().err
        assert code == 1
        assert "was produced from different inputs" in err or "different inputs" in err, err
        assert "--force" in err
    finally:
        for part in ("models", "data"):
            shutil.rmtree(root / part)
            shutil.copytree(backup / part, root / part)
    assert set(_status(finished, capsys).values()) == {"done"}
