"""Every row of docs/bad-inputs.md, run: exit status and what the user sees.

The document is the single source of truth for the expected messages; this file only
builds each input (one function per row id) and runs the row's command through the real
CLI entry point. A row without a builder or a builder without a row fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fuselm.cli import main
from fuselm.testing import build_tokenizer, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"


@dataclass(frozen=True)
class Row:
    id: str
    stage: str
    exit: int
    excerpts: tuple[str, ...]


def doc_rows() -> list[Row]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([a-z0-9-]+)` \| (\w+) \| .* \| (\d) \| (.*) \|$", line)
        if m:
            excerpts = tuple(re.findall(r"`([^`]+)`", m.group(4)))
            rows.append(Row(m.group(1), m.group(2), int(m.group(3)), excerpts))
    return rows


ROWS = doc_rows()
BUILDERS: dict[str, Callable[[Ctx], list[str] | None]] = {}


def case(cid: str):
    def register(fn):
        BUILDERS[cid] = fn
        return fn

    return register


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_models) -> dict[str, Any]:
    """Models that must be refused, and a small text corpus; built once for the module."""
    from safetensors.torch import load_file, save_file
    from transformers import ByT5Tokenizer, DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("bad-kit")
    good = tiny_models["bpe"]
    bpe = build_tokenizer("bpe")
    out: dict[str, Any] = {"good": good, "spm": tiny_models["spm"], "root": root}
    enc = root / "encoder"
    DistilBertModel(
        DistilBertConfig(vocab_size=600, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    ).save_pretrained(enc)
    bpe.save_pretrained(enc)
    out["encoder"] = enc
    slow = root / "slow"
    save_tiny_model(slow, bpe, vocab_rows=400)
    for f in slow.glob("tokenizer*"):
        f.unlink()
    ByT5Tokenizer().save_pretrained(slow)
    out["slow"] = slow
    nan = root / "nan"
    save_tiny_model(nan, bpe)
    sd = load_file(nan / "model.safetensors")
    sd["lm_head.weight"][:] = float("nan")
    save_file(sd, nan / "model.safetensors", metadata={"format": "pt"})
    out["nan"] = nan
    remote = root / "remote"
    shutil.copytree(good, remote)
    (remote / "config.json").write_text(
        '{"model_type": "fancy_lm", "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig",'
        ' "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}, "vocab_size": 600}'
    )
    (remote / "configuration_fancy.py").write_text(
        "raise SystemExit('remote code ran')\n"  # must never be imported
    )
    out["remote"] = remote
    pkl = root / "pickle"
    shutil.copytree(good, pkl)
    torch.save(load_file(pkl / "model.safetensors"), pkl / "pytorch_model.bin")
    (pkl / "model.safetensors").unlink()
    out["pickle"] = pkl
    out["mismatch"] = save_tiny_model(root / "mismatch", bpe, vocab_rows=400)
    noweights = root / "noweights"
    shutil.copytree(good, noweights)
    (noweights / "model.safetensors").unlink()
    out["noweights"] = noweights
    notok = root / "notok"
    shutil.copytree(good, notok)
    for f in list(notok.glob("tokenizer*")) + list(notok.glob("special_tokens*")):
        f.unlink()
    out["notok"] = notok
    out["lower"] = save_tiny_model(root / "lower", build_tokenizer("wordpiece_lower"))
    special = build_tokenizer("bpe")
    special.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    out["special"] = save_tiny_model(root / "special", special)
    corpus = root / "corpus.jsonl"
    docs = [f"Document {i}: Café au lait, 12345 apples.\n" * (i + 2) for i in range(8)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out["corpus"] = corpus
    return out


class Ctx:
    """One case's folder, config writer and run dir."""

    def __init__(self, tmp: Path, kit: dict[str, Any]) -> None:
        self.tmp, self.kit = tmp, kit
        self.run = tmp / "run"
        self.cleanups: list[Any] = []  # run after the case, pass or fail

    def config(self, **sections: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "corpus": {
                "inputs": [{"path": str(self.kit["corpus"])}],
                "block_tokens": 64,
                "validation_fraction": 0.25,
            },
            "target": {"model": str(self.kit["good"]), "name": "tgt", "as_source": False},
            "train": {"max_steps": 2, "seq_len": 64, "batch_size": 2, "save_steps": 1},
        }
        cfg.update(sections)
        return cfg

    def write(self, cfg: dict[str, Any] | str, name: str = "run.yaml") -> Path:
        path = self.tmp / name
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    def stage(self, stage: str, cfg: dict[str, Any] | str | Path, *extra: str) -> list[str]:
        path = cfg if isinstance(cfg, Path) else self.write(cfg)
        return [stage, "-c", str(path), "-o", str(self.run), *extra]

    def corpus(self, files: dict[str, bytes]) -> dict[str, Any]:
        """A corpus folder with these files, as the config's `corpus` section."""
        folder = self.tmp / "data"
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        inputs = [{"path": str(folder / n)} for n in files]
        return {"inputs": inputs, "block_tokens": 64, "validation_fraction": 0.25}

    def source(self, key: str, **extra: Any) -> list[str]:
        """Prepare with the good target, then capture with a bad source named ``key``."""
        cfg = self.config()
        assert main(["-q", *self.stage("prepare", cfg)]) == 0
        src = {"model": str(self.kit.get(key, self.kit["good"])), "name": key, **extra}
        return self.stage("capture", self.config(sources=[src]))


def _json(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode()


# --------------------------------------------------------------------------- corpus


@case("corpus-empty-file")
def _(c: Ctx):
    return c.stage("prepare", c.config(corpus=c.corpus({"empty.txt": b""})))


@case("corpus-binary-file")
def _(c: Ctx):
    cfg = c.config(corpus=c.corpus({"blob.txt": b"\x00\x01\x02binary\x00" * 50}))
    return c.stage("prepare", cfg)


@case("corpus-binary-in-folder")
def _(c: Ctx):
    c.corpus({"blob.bin": b"\x00\x01\x02binary\x00" * 50})
    return c.stage("prepare", c.config(corpus={"inputs": [{"path": str(c.tmp / "data")}]}))


@case("corpus-not-utf8")
def _(c: Ctx):
    return c.stage("prepare", c.config(corpus=c.corpus({"latin1.txt": "Café".encode("latin-1")})))


@case("corpus-missing-path")
def _(c: Ctx):
    cfg = c.config(corpus={"inputs": [{"path": str(c.tmp / "nowhere")}]})
    return c.stage("prepare", cfg)


@case("corpus-no-inputs")
def _(c: Ctx):
    return c.stage("prepare", c.config(corpus={"inputs": []}))


@case("jsonl-malformed")
def _(c: Ctx):
    data = _json({"text": "fine"}) + b'{"text": "cut\n'
    return c.stage("prepare", c.config(corpus=c.corpus({"docs.jsonl": data})))


@case("jsonl-no-text-field")
def _(c: Ctx):
    cfg = c.config(corpus=c.corpus({"docs.jsonl": _json({"body": "text under another name"})}))
    return c.stage("prepare", cfg)


@case("jsonl-text-not-string")
def _(c: Ctx):
    return c.stage("prepare", c.config(corpus=c.corpus({"docs.jsonl": _json({"text": 5})})))


@case("jsonl-domain-not-string")
def _(c: Ctx):
    data = _json({"text": "hello there", "domain": [1]})
    return c.stage("prepare", c.config(corpus=c.corpus({"docs.jsonl": data})))


@case("jsonl-not-object")
def _(c: Ctx):
    return c.stage("prepare", c.config(corpus=c.corpus({"docs.jsonl": b"[1, 2]\n"})))


@case("parquet-corrupt")
def _(c: Ctx):
    cfg = c.config(corpus=c.corpus({"data.parquet": b"this is not parquet at all"}))
    return c.stage("prepare", cfg)


@case("parquet-text-not-string")
def _(c: Ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = c.config(corpus=c.corpus({"data.parquet": b""}))
    pq.write_table(pa.table({"text": [1, 2, 3]}), c.tmp / "data" / "data.parquet")
    return c.stage("prepare", cfg)


@case("corpus-huge-single-line")
def _(c: Ctx):
    cfg = c.config(corpus=c.corpus({"huge.txt": b"x" * 200_000}))
    cfg["corpus"]["block_tokens"] = 2048  # fewer, larger blocks: the case is the line
    return c.stage("prepare", cfg)


@case("corpus-whitespace-only")
def _(c: Ctx):
    cfg = c.config(corpus=c.corpus({"a.txt": b"Some real text.\n", "b.txt": b"  \n\t \n"}))
    return c.stage("prepare", cfg)


# --------------------------------------------------------------------------- config


@case("config-missing-file")
def _(c: Ctx):
    return ["prepare", "-c", str(c.tmp / "nope.yaml"), "-o", str(c.run)]


@case("config-invalid-yaml")
def _(c: Ctx):
    return c.stage("prepare", "corpus: {inputs: [\n")


@case("config-python-tag")
def _(c: Ctx):
    marker = c.tmp / "pwned"
    return c.stage("prepare", f"corpus: !!python/object/apply:os.system ['touch {marker}']\n")


@case("config-not-mapping")
def _(c: Ctx):
    return c.stage("prepare", "- corpus\n- target\n")


def _override(key: str, value: Any) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        cfg = c.config()
        section, field = key.split(".")
        cfg.setdefault(section, {})[field] = value
        return c.stage("prepare", cfg)

    return build


for _cid, _key, _value in [
    ("config-unknown-key", "train.lerning_rate", 1e-4),
    ("config-wrong-type", "corpus.block_tokens", "many"),
    ("config-zero-size", "train.batch_size", 0),
    ("config-negative-size", "corpus.block_tokens", -5),
    ("config-unknown-fusion", "fuse.function", "max_ce"),
    ("config-unknown-alignment", "align.method", "dtw"),
    ("config-lambda-above-one", "train.clm_weight", 1.5),
    ("config-lambda-negative", "train.clm_weight", -0.1),
    ("config-top-k-zero", "capture.top_k", 0),
]:
    case(_cid)(_override(_key, _value))


@case("config-wrong-type-list")
def _(c: Ctx):
    return c.stage("prepare", c.config(sources="abc"))


@case("config-name-escapes-run-dir")
def _(c: Ctx):
    return c.stage("prepare", c.config(sources=[{"model": str(c.kit["spm"]), "name": "../../x"}]))


@case("config-duplicate-names")
def _(c: Ctx):
    src = [{"model": str(c.kit["spm"]), "name": "a"}, {"model": str(c.kit["good"]), "name": "a"}]
    return c.stage("prepare", c.config(sources=src))


# --------------------------------------------------------------------------- models


@case("model-missing-path")
def _(c: Ctx):
    return c.source("ghost", model=str(c.tmp / "models" / "ghost"))


for _cid, _key in [
    ("model-missing-weights", "noweights"),
    ("model-missing-tokenizer", "notok"),
    ("model-vocab-mismatch", "mismatch"),
    ("model-not-causal", "encoder"),
    ("model-pickle-weights", "pickle"),
    ("model-remote-code", "remote"),
    ("tokenizer-slow-no-offsets", "slow"),
    ("model-nan-logits", "nan"),
]:
    case(_cid)(lambda c, key=_key: c.source(key))


def _captured(c: Ctx, key: str, target_as_source: bool = False) -> dict[str, Any]:
    """Prepare + capture with source ``key``; returns the config (written as run.yaml)."""
    cfg = c.config(sources=[{"model": str(c.kit[key]), "name": key}])
    cfg["target"]["as_source"] = target_as_source
    assert main(["-q", *c.stage("prepare", cfg)]) == 0
    assert main(["-q", *c.stage("capture", cfg)]) == 0
    return cfg


@case("tokenizer-normalising")
def _(c: Ctx):
    return c.stage("align", _captured(c, "lower"))


@case("tokenizer-special-one-side")
def _(c: Ctx):
    cfg = c.config(corpus=c.corpus({"a.txt": b"Call <|tool|> now, then <|tool|> again.\n" * 20}))
    cfg["corpus"]["validation_fraction"] = 0.0
    cfg["sources"] = [{"model": str(c.kit["special"]), "name": "special"}]
    assert main(["-q", *c.stage("prepare", cfg)]) == 0
    assert main(["-q", *c.stage("capture", cfg)]) == 0
    return c.stage("align", cfg)


# --------------------------------------------------------------------------- pipeline


@case("capture-other-corpus")
def _(c: Ctx):
    cfg = c.config(sources=[{"model": str(c.kit["spm"]), "name": "spm"}])
    cfg["corpus"] = c.corpus({"a.txt": b"The first version of the corpus.\n" * 30})
    assert main(["-q", *c.stage("prepare", cfg)]) == 0
    assert main(["-q", *c.stage("capture", cfg)]) == 0
    (c.tmp / "data" / "a.txt").write_bytes(b"The second version, edited.\n" * 30)
    assert main(["-q", *c.stage("prepare", cfg, "--force")]) == 0
    return c.stage("align", cfg)


@case("capture-shard-corrupt")
def _(c: Ctx):
    cfg = _captured(c, "spm")
    shard = sorted((c.run / "capture" / "spm").glob("*.parquet"))[0]
    shard.write_bytes(b"garbage" * 100)
    return c.stage("align", cfg)


@case("stage-stale-config")
def _(c: Ctx):
    cfg = _captured(c, "spm")
    return c.stage("capture", cfg, "capture.top_k=5")


@case("checkpoint-other-run")
def _(c: Ctx):
    from fuselm.train.trainer import STOP_ENV, TrainingInterrupted

    cfg = _captured(c, "spm", target_as_source=True)
    assert main(["-q", *c.stage("align", cfg)]) == 0
    other = c.tmp / "other"  # the same inputs with another learning rate, interrupted
    shutil.copytree(c.run, other)
    os.environ[STOP_ENV] = "1"
    try:
        for run, lr in ((other, 2e-5), (c.run, 1e-5)):
            argv = ["-q", "train", "-c", str(c.write(cfg)), "-o", str(run)]
            with pytest.raises(TrainingInterrupted):
                main([*argv, f"train.learning_rate={lr}", "eval.control=false"])
    finally:
        del os.environ[STOP_ENV]
    ckpts = c.run / "train" / "fused" / "checkpoints"
    shutil.rmtree(ckpts)
    shutil.copytree(other / "train" / "fused" / "checkpoints", ckpts)
    return c.stage("train", cfg, "train.learning_rate=1e-5", "eval.control=false")


@case("manifest-corrupt")
def _(c: Ctx):
    cfg = c.config()
    cfg["target"]["as_source"] = True
    assert main(["-q", *c.stage("prepare", cfg)]) == 0
    (c.run / "prepare" / "manifest.json").write_text("{ not json")
    return c.stage("capture", cfg)


@case("run-dir-foreign")
def _(c: Ctx):
    c.run.mkdir()
    (c.run / "thesis.tex").write_text("precious")
    return c.stage("prepare", c.config())


@case("run-dir-is-file")
def _(c: Ctx):
    c.run.write_text("a file")
    return c.stage("prepare", c.config())


@case("run-dir-in-use")
def _(c: Ctx):
    import fcntl

    c.run.mkdir()
    # Held as another process would hold it: flock through a descriptor of our own, the
    # pid of a live process that is not us in the file.
    fd = os.open(c.run / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    c.cleanups.append(lambda: os.close(fd))
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, str(os.getppid()).encode())
    return c.stage("prepare", c.config())


# --------------------------------------------------------------------------- tests


def test_every_documented_case_has_a_test_and_back():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "duplicate ids in docs/bad-inputs.md"
    assert set(ids) == set(BUILDERS), set(ids) ^ set(BUILDERS)
    errors = [r for r in ROWS if r.exit != 0]
    assert len(errors) >= 25
    assert all(r.excerpts for r in ROWS)


def test_readme_links_the_table():
    assert "docs/bad-inputs.md" in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, kit, tmp_path, capsys):
    c = Ctx(tmp_path, kit)
    try:
        argv = BUILDERS[row.id](c)
        capsys.readouterr()
        code = main(argv)
        out = capsys.readouterr()
    finally:
        for cleanup in c.cleanups:
            cleanup()
    seen = out.err + out.out
    assert code == row.exit, seen
    assert "Traceback" not in seen
    pos = 0
    for excerpt in row.excerpts:
        at = seen.find(excerpt, pos)
        assert at >= 0, f"{excerpt!r} not in (after position {pos}):\n{seen}"
        pos = at + len(excerpt)
    if row.exit:
        assert seen.count("error: ") == 1, seen
    assert not (tmp_path / "pwned").exists()  # config-python-tag: nothing was executed


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    """A failure no check anticipated: one line by default, the traceback with --debug."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("corpus: {inputs: [{path: x.txt}]}\n")
    code = (
        "import sys, fuselm.corpus as c\n"
        "def boom(*a, **k): raise KeyError('surprise')\n"
        "c.run_prepare = boom\n"
        "from fuselm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", code]
    plain = subprocess.run(
        [*args, "prepare", "-c", str(cfg), "-o", str(tmp_path / "r")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    assert "error: KeyError: 'surprise'" in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run(
        [*args, "--debug", "prepare", "-c", str(cfg), "-o", str(tmp_path / "r2")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "surprise" in debug.stderr
