from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuselm.artifacts import Stage, StageError
from fuselm.cli import main
from fuselm.config import CorpusInput, load_config
from fuselm.corpus import (
    Budget,
    CorpusError,
    is_validation,
    iter_documents,
    read_blocks,
    reassemble,
    run_prepare,
    split_document,
)
from fuselm.testing import build_tokenizer


def _budget(count, limit: int, text: str) -> Budget:
    # A guide that is deliberately wrong (one token per character): the verification
    # loop, not the guess, must guarantee the limit.
    return Budget(count, limit, np.arange(1, len(text) + 1))


def _words(text: str) -> int:
    return len(text.split()) + text.count("\n")


# ----------------------------------------------------------------------------- pure blocking

TEXT = st.text(
    alphabet=st.sampled_from(list("ab cd\n\t  éü漢字🙂0123456789.,")) | st.characters(),
    max_size=600,
)


@settings(max_examples=150, deadline=None)
@given(text=TEXT, limit=st.integers(min_value=2, max_value=40))
def test_split_covers_exactly_and_fits(text, limit):
    spans = split_document(text, [_budget(_words, limit, text), _budget(len, limit * 3, text)])
    assert "".join(text[s:e] for s, e in spans) == text
    assert all(e > s for s, e in spans)
    assert all(s2 == e1 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))
    for s, e in spans:
        assert len(text[s:e]) <= limit * 3
        # a word count can exceed the limit only for a single unsplittable run
        assert _words(text[s:e]) <= limit or e - s == 1


@pytest.fixture(scope="module")
def real_tokenizers():
    return [build_tokenizer(f) for f in ("bpe", "spm", "wordpiece")]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXT, limit=st.integers(min_value=8, max_value=30))
def test_split_fits_every_real_tokenizer(real_tokenizers, text, limit):
    from fuselm.corpus import _counter, _ends

    budgets = [Budget(_counter(t), limit, _ends(t, text)) for t in real_tokenizers]
    spans = split_document(text, budgets)
    assert "".join(text[s:e] for s, e in spans) == text
    for s, e in spans:
        for t in real_tokenizers:
            assert len(t(text[s:e], add_special_tokens=False)["input_ids"]) <= limit


def test_cuts_prefer_newlines_then_whitespace():
    import re

    text = "alpha beta gamma\ndelta epsilon zeta eta theta\niota kappa"
    ends = np.array([m.end() for m in re.finditer(r"\S+|\n", text)])  # an exact guide
    spans = split_document(text, [Budget(_words, 6, ends)])
    pieces = [text[s:e] for s, e in spans]
    assert pieces[0] == "alpha beta gamma\n"
    assert all(not p.startswith(("ta", "eta")) or p.startswith(" ") for p in pieces[1:])


def test_one_document_longer_than_any_context_is_split_not_dropped():
    text = "word " * 5000 + "\n" + "x" * 3000  # includes a 3000-char run with no whitespace
    spans = split_document(text, [_budget(len, 500, text)])
    assert len(spans) > 10
    assert "".join(text[s:e] for s, e in spans) == text
    assert max(e - s for s, e in spans) <= 500


def test_validation_split_is_seed_stable_and_by_document():
    ids = [f"0:file{i}.py" for i in range(2000)]
    a = [is_validation(d, 0, 0.1) for d in ids]
    assert a == [is_validation(d, 0, 0.1) for d in reversed(ids)][::-1]
    assert 0.07 < sum(a) / len(a) < 0.13
    assert a != [is_validation(d, 1, 0.1) for d in ids]
    assert not any(is_validation(d, 0, 0.0) for d in ids)


# ----------------------------------------------------------------------------- the stage


def _blocks(run_dir: Path) -> list[dict]:
    return read_blocks(run_dir).to_pylist()


def _originals(corpus_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted((corpus_dir / "code").glob("*.py")):
        out[f"0:{p.name}"] = p.read_bytes().decode("utf-8")
    for i, line in enumerate((corpus_dir / "docs.jsonl").read_text("utf-8").splitlines(), 1):
        text = json.loads(line)["text"]
        if text.strip():
            out[f"1:docs.jsonl:{i}"] = text
    return out


def test_prepare_end_to_end(base_config, write_config, corpus_dir, tmp_path, caplog):
    cfg_path = write_config(base_config)
    run_dir = tmp_path / "run"
    assert main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    blocks = _blocks(run_dir)

    # (a) blocks reassemble to the original documents exactly
    assert reassemble(blocks) == _originals(corpus_dir)
    # (b) no block exceeds its limit under any tokenizer, special tokens included
    cfg = load_config(cfg_path)
    from fuselm.models import load_tokenizer, model_context

    for m in cfg.models():
        tok, ctx = load_tokenizer(m), min(model_context(m), cfg.corpus.block_tokens)
        longest = max(len(tok(b["text"])["input_ids"]) for b in blocks)
        assert longest <= ctx, (m.resolved_name(), longest, ctx)
    # block records carry what later stages need
    b0 = blocks[0]
    assert b0["hash"] == hashlib.sha256(b0["text"].encode()).hexdigest()[:32]
    assert {b["domain"] for b in blocks} == {"code", "prose", "misc"}
    by_doc = {}
    for b in blocks:
        by_doc.setdefault(b["doc_id"], set()).add(b["split"])
    assert all(len(s) == 1 for s in by_doc.values())  # a document never straddles splits
    assert {"train", "validation"} == {b["split"] for b in blocks}
    man = Stage(run_dir, "prepare").manifest()
    assert man["stats"]["skipped_empty"] == 1
    assert man["stats"]["documents"] == len(_originals(corpus_dir))
    assert set(man["stats"]["domains"]) == {"code", "prose", "misc"}

    # (c) rerun: skipped, shards untouched
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run_dir / "prepare").glob("*.parquet")}
    with caplog.at_level(logging.INFO, logger="fuselm"):
        assert main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    assert "skipped" in caplog.text
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (run_dir / "prepare").glob("*.parquet")}

    # identical output in a fresh run directory (deterministic), even sharded differently
    other = tmp_path / "run2"
    assert (
        main(["prepare", "-c", str(cfg_path), "-o", str(other), "corpus.blocks_per_shard=7"]) == 0
    )
    assert sorted(b["hash"] for b in _blocks(other)) == sorted(b["hash"] for b in blocks)
    assert len(list((other / "prepare").glob("train-*.parquet"))) > 1


def test_status_reports_done_stale_partial_missing(base_config, write_config, tmp_path, capsys):
    cfg_path = write_config(base_config)
    run_dir = tmp_path / "run"
    assert main(["status", str(tmp_path / "nope")]) == 1
    main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)])
    capsys.readouterr()
    assert main(["status", str(run_dir), "-c", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "prepare" in out and "done" in out and "capture/spm" in out and "missing" in out
    assert main(["status", str(run_dir), "-c", str(cfg_path), "corpus.seed=3"]) == 0
    assert "stale" in capsys.readouterr().out
    # an interrupted run shows up as partial
    (run_dir / "prepare" / "manifest.json").unlink()
    (run_dir / "prepare" / "_pending.json").write_text(
        json.dumps({"fingerprint": "x", "shards": []})
    )
    main(["status", str(run_dir)])
    assert "partial" in capsys.readouterr().out


def test_changed_corpus_is_refused_then_forced(
    base_config, write_config, corpus_dir, tmp_path, capsys
):
    cfg_path = write_config(base_config)
    run_dir = tmp_path / "run"
    main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)])
    (corpus_dir / "code" / "this.py").write_text("print('edited')\n")
    assert main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "different inputs" in err and "inputs" in err and "--force" in err
    assert main(["prepare", "-c", str(cfg_path), "-o", str(run_dir), "--force"]) == 0
    assert "print('edited')\n" in {b["text"] for b in _blocks(run_dir)}


def test_run_dir_of_another_run_is_refused(base_config, write_config, tmp_path, corpus_dir, capsys):
    run_dir = tmp_path / "run"
    main(["prepare", "-c", str(write_config(base_config)), "-o", str(run_dir)])
    other = dict(
        base_config,
        corpus=dict(base_config["corpus"], inputs=[{"path": str(corpus_dir / "docs.jsonl")}]),
    )
    capsys.readouterr()
    assert main(["prepare", "-c", str(write_config(other, "other.yaml")), "-o", str(run_dir)]) == 1
    assert "produced from different inputs" in capsys.readouterr().err


def test_foreign_run_dir_is_refused(base_config, write_config, tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    assert main(["prepare", "-c", str(write_config(base_config)), "-o", str(d)]) == 1
    assert "not a fuselm run directory" in capsys.readouterr().err
    assert (d / "thesis.tex").read_text() == "precious"


# ----------------------------------------------------------------------------- bad input


def _prepare(cfg: dict, write_config, tmp_path) -> None:
    run_prepare(load_config(write_config(cfg)), tmp_path / "run")


def _with_inputs(base: dict, inputs: list[dict], **corpus) -> dict:
    return dict(base, corpus=dict(base["corpus"], inputs=inputs, **corpus))


def test_missing_input_path(base_config, write_config, tmp_path):
    cfg = _with_inputs(base_config, [{"path": str(tmp_path / "absent")}])
    with pytest.raises(CorpusError, match=r"corpus\.inputs\[0\]\.path: .*absent does not exist"):
        _prepare(cfg, write_config, tmp_path)


def test_empty_corpus(base_config, write_config, tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    (tmp_path / "blank" / "b.txt").write_text("")
    cfg = _with_inputs(base_config, [{"path": str(tmp_path / "blank")}])
    with pytest.raises(CorpusError, match=r"corpus is empty.*skipped 2 empty"):
        _prepare(cfg, write_config, tmp_path)
    assert Stage(tmp_path / "run", "prepare").manifest() is None


def test_invalid_utf8_names_file_and_offset(base_config, write_config, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("héllo wörld".encode("latin-1"))
    cfg = _with_inputs(base_config, [{"path": str(bad)}])
    with pytest.raises(
        CorpusError, match=r"latin1\.txt: not valid UTF-8 at byte offset 1 .*corpus\.errors=replace"
    ):
        _prepare(cfg, write_config, tmp_path)
    cfg = _with_inputs(base_config, [{"path": str(bad)}], errors="replace")
    _prepare(cfg, write_config, tmp_path)
    assert "h\ufffdllo" in _blocks(tmp_path / "run")[0]["text"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.txt"])
def test_utf8_bom_is_read_as_text(base_config, write_config, tmp_path, name):
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not text.
    f = tmp_path / name
    body = {
        "d.jsonl": '{"text": "The first line of prose."}\n{"text": "A second document."}\n',
        "d.json": '[{"text": "The first line of prose."}, {"text": "A second document."}]',
        "d.txt": "The first line of prose.\nA second document.\n",
    }[name]
    f.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    _prepare(_with_inputs(base_config, [{"path": str(f)}]), write_config, tmp_path)
    texts = [b["text"] for b in _blocks(tmp_path / "run")]
    assert texts and all("\ufeff" not in t for t in texts)
    assert any(t.startswith("The first line of prose.") for t in texts)


def test_jsonl_problems_name_file_and_line(base_config, write_config, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
    cfg = _with_inputs(base_config, [{"path": str(f)}])
    with pytest.raises(
        CorpusError, match=r"d\.jsonl:2: no 'text' field \(fields: body\).*text_field"
    ):
        _prepare(cfg, write_config, tmp_path)
    f.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(CorpusError, match=r"d\.jsonl:2: not valid JSON"):
        _prepare(cfg, write_config, tmp_path)
    # the documented remedy works
    f.write_text('{"body": "fine text"}\n')
    _prepare(
        _with_inputs(base_config, [{"path": str(f), "text_field": "body"}]),
        write_config,
        tmp_path / "x",
    )


def test_parquet_input_and_binary_files(base_config, write_config, tmp_path):
    import pyarrow as pa

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text document\n")
    (folder / "b.bin").write_bytes(b"\x00\x01\x02binary")
    (folder / ".hidden.txt").write_text("never read")
    pq.write_table(
        pa.table({"text": ["row one", "row two"], "domain": ["x", "y"]}), tmp_path / "t.parquet"
    )
    cfg = _with_inputs(
        base_config,
        [{"path": str(folder), "domain": "txt"}, {"path": str(tmp_path / "t.parquet")}],
        validation_fraction=0.0,
    )
    _prepare(cfg, write_config, tmp_path)
    blocks = _blocks(tmp_path / "run")
    assert sorted((b["text"], b["domain"]) for b in blocks) == [
        ("plain text document\n", "txt"),
        ("row one", "x"),
        ("row two", "y"),
    ]
    man = Stage(tmp_path / "run", "prepare").manifest()
    assert man["stats"]["skipped_binary"] == 1


def test_hf_dataset_offline_is_a_clear_error():
    inp = CorpusInput(hf_dataset="no-such-org/no-such-dataset")
    with pytest.raises(CorpusError, match=r"cannot load 'no-such-org/no-such-dataset'.*use `path`"):
        list(iter_documents(inp, 0, "strict", {}))


def test_prepare_needs_models(write_config, corpus_dir, tmp_path):
    cfg = {"corpus": {"inputs": [{"path": str(corpus_dir / "docs.jsonl")}]}}
    with pytest.raises(StageError, match="configure `target.model`"):
        _prepare(cfg, write_config, tmp_path)


def test_missing_model_is_a_clear_error(base_config, write_config, tmp_path, capsys):
    cfg = dict(base_config, target={"model": str(tmp_path / "no-model"), "name": "tgt"})
    assert main(["prepare", "-c", str(write_config(cfg)), "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "model 'tgt': cannot load" in err and "no-model" in err


def test_typo_in_yaml_via_cli(base_config, write_config, tmp_path, capsys):
    cfg = dict(base_config, corpus=dict(base_config["corpus"], block_tokns=100))
    assert main(["prepare", "-c", str(write_config(cfg)), "-o", str(tmp_path / "r")]) == 1
    assert "did you mean 'block_tokens'" in capsys.readouterr().err
