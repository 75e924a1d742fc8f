"""Align stage end to end: prepare -> capture -> align on tiny models of four tokenizer
families; identity for the target, boundaries, mass accounting, byte counts, the storage
codec, skip / stale / force / resume, hash joins and normalising tokenizers."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fuselm.align import align_offsets, remap_topk, special_positions, vocab_surface
from fuselm.align.blocks import encode_target, token_byte_ends
from fuselm.align.dtw import TokenSeq, align_mined_dp
from fuselm.align.offsets import text_index
from fuselm.align.records import AlignedBlock
from fuselm.align.store import (
    align_manifest,
    aligned_shards,
    decode_aligned_row,
    encode_aligned,
    iter_aligned,
    load_aligned,
    shard_metadata,
)
from fuselm.artifacts import Stage, write_parquet_atomic
from fuselm.capture import load_capture, storage
from fuselm.cli import main
from fuselm.corpus import read_blocks
from fuselm.testing import FIXTURE_TEXTS, build_tokenizer, save_tiny_model

TOL = storage.STEP / 2 + 1e-5  # one quantisation step of the codec
# name -> (tokenizer family, architecture)
TEACHERS = {
    "tgt": ("bpe", "llama"),
    "spm": ("spm", "gpt2"),
    "wp": ("wordpiece", "llama"),
    "wpl": ("wordpiece_lower", "gpt2"),
    "bper": ("bpe", "llama"),  # + a Replace("é", "e") normalizer its JSON does not flag
}
SOURCES = ("spm", "wp", "wpl")  # the generic checks; "bper" has its own test


def _config(models: dict[str, Path], data: Path) -> dict:
    return {
        "corpus": {
            "inputs": [{"path": str(data)}],
            "block_tokens": 40,
            "validation_fraction": 0.25,
        },
        "target": {"model": str(models["tgt"]), "name": "tgt"},
        "sources": [{"model": str(models[n]), "name": n} for n in (*SOURCES, "bper")],
        "capture": {"blocks_per_shard": 8, "batch_tokens": 400},
    }


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["-q", *argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def aligned(tmp_path_factory) -> dict:
    """One prepare + capture + align over four teachers (shared by read-only tests)."""
    root = tmp_path_factory.mktemp("align-run")
    models = {
        n: save_tiny_model(root / "m" / n, _tok(n), arch=arch, max_positions=128)
        for n, (_, arch) in TEACHERS.items()
    }
    data = root / "data"
    data.mkdir()
    for i, text in enumerate(FIXTURE_TEXTS):
        (data / f"doc{i}.txt").write_text(text * 2, encoding="utf-8")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(_config(models, data)), encoding="utf-8")
    run = root / "run"
    for stage in ("prepare", "capture"):
        assert _run(stage, "-c", str(cfg), "-o", str(run))[0] == 0
    code, printed = _run("align", "-c", str(cfg), "-o", str(run))
    assert code == 0
    texts = {b["hash"]: b["text"] for b in read_blocks(run).to_pylist()}
    return {"root": root, "cfg": cfg, "run": run, "printed": printed, "texts": texts}


def _copy(aligned: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(aligned["run"], run)
    return run


def _tok(name: str):
    tok = build_tokenizer(TEACHERS[name][0])
    if name == "bper":
        from tokenizers import normalizers

        tok.backend_tokenizer.normalizer = normalizers.Replace("é", "e")
    return tok


# ----------------------------------------------------------------------------- units


def test_store_round_trip_keeps_ids_and_sorts_merged_rows():
    rng = np.random.default_rng(0)
    for t in (0, 1, 2, 40):
        p = max(t - 1, 0)
        valid = rng.random(p) < 0.6
        lp = -np.cumsum(rng.exponential(0.7, (p, 5)), axis=1)
        ids = rng.integers(0, 2**17, (p, 5))
        ids[:, -1] = -1  # a dropped entry
        lp[:, -1] = -np.inf
        if p:  # a merge lifted the third entry above the first two
            lp[0, 2] = -0.01
        ids[~valid], lp[~valid] = -1, -np.inf
        rec = AlignedBlock(
            hash="h",
            block_id="d#0",
            domain="x",
            split="train",
            input_ids=rng.integers(0, 2**17, t).astype(np.int32),
            ids=ids.astype(np.int32),
            logprobs=lp.astype(np.float32),
            valid=valid,
            gold=np.where(valid, -rng.exponential(2.0, p), 0.0).astype(np.float32),
            next_bytes=np.where(valid, rng.integers(0, 9, p), 0).astype(np.int32),
            nll_sum=12.5,
            nll_bytes=77,
            tail_logmass=np.where(valid, -rng.exponential(3.0, p), -np.inf).astype(np.float32),
            one_to_one=valid & (rng.random(p) < 0.5),
        )
        back = decode_aligned_row(encode_aligned(rec), 5)
        assert np.array_equal(back.input_ids, rec.input_ids)
        assert np.array_equal(back.valid, valid)
        assert np.array_equal(back.one_to_one, rec.one_to_one)
        assert np.isneginf(back.tail_logmass[~valid]).all()
        assert np.abs(back.tail_logmass[valid] - rec.tail_logmass[valid]).max(initial=0) <= TOL
        assert np.array_equal(back.next_bytes, rec.next_bytes)
        assert np.abs(back.gold - rec.gold).max(initial=0) <= TOL
        assert (back.nll_sum, back.nll_bytes) == (12.5, 77)
        for r in range(p):  # the same (id, value) pairs, most probable first
            got = dict(zip(back.ids[r].tolist(), back.logprobs[r].tolist(), strict=True))
            want = dict(zip(rec.ids[r].tolist(), rec.logprobs[r].tolist(), strict=True))
            assert got.keys() == want.keys()
            fin = [i for i in want if i >= 0]
            assert all(abs(got[i] - want[i]) <= TOL for i in fin)
            assert np.all(np.diff(back.logprobs[r][np.isfinite(back.logprobs[r])]) <= 0)


def test_token_byte_ends_partition_the_text():
    text = "  Café 東\n"
    tix = text_index(text)
    total = len(text.encode())
    # WordPiece-like: leading whitespace and the trailing newline are in no token.
    off = np.array([[0, 0], [2, 6], [7, 8], [9, 9]])
    special = np.array([True, False, False, True])  # [CLS] ... [SEP]
    nb = np.array([0, 5, 3, 0])
    ends = token_byte_ends(tix, off, special, nb)
    assert ends.tolist() == [0, 7, total, total]  # leading CLS at 0; last text to the end
    # Byte-level BPE splitting 東 (3 bytes) over two tokens with the same offsets.
    off = np.array([[0, 6], [6, 8], [7, 8], [8, 9]])
    nb = np.array([7, 2, 2, 1])
    ends = token_byte_ends(tix, off, np.zeros(4, bool), nb)
    assert ends.tolist() == [7, 9, 11, total]
    assert np.diff(ends).sum() == total - ends[0]


def test_encode_target_matches_the_capture_of_the_target(aligned):
    caps = load_capture(aligned["run"], "tgt")
    texts = [aligned["texts"][h] for h in caps]
    toks = encode_target(_tok("tgt"), texts, "auto")
    for cap, tok in zip(caps.values(), toks, strict=True):
        assert np.array_equal(cap.token_ids, tok.token_ids)
        assert np.array_equal(cap.offsets, tok.offsets)
        assert cap.text_roundtrip == tok.text_roundtrip
    added = encode_target(_tok("spm"), texts[:2], "add")
    assert all(t.token_ids[0] == _tok("spm").bos_token_id for t in added)


# ----------------------------------------------------------------------------- the stage


def test_target_alignment_is_its_own_capture(aligned):
    run = aligned["run"]
    caps = load_capture(run, "tgt")
    al = load_aligned(run, "tgt")
    assert al.keys() == caps.keys()
    for h, cap in caps.items():
        a = al[h]
        assert np.array_equal(a.input_ids, cap.token_ids)
        assert np.array_equal(a.ids, cap.ids)  # identity: exact, not within tolerance
        assert np.array_equal(a.logprobs, cap.logprobs)
        assert np.array_equal(a.gold, cap.gold)
        assert a.valid.all() and a.n_positions == cap.n_positions
        assert np.array_equal(a.tail_logmass, cap.tail_logmass) and a.one_to_one.all()
        # The prediction of the first text token (after a BOS) is not in the block CE.
        skip = np.zeros(a.n_positions, bool)
        sp = special_positions(cap.token_ids, cap.offsets, vocab_surface(_tok("tgt")))
        first_text = int(np.flatnonzero(~sp)[0])
        if first_text >= 1:
            skip[first_text - 1] = True
        assert a.nll_bytes == a.next_bytes[~skip].sum()
        gold = cap.gold.astype(np.float64)
        assert a.nll_sum == pytest.approx(-gold[~skip & ~sp[1:]].sum(), abs=1e-3)
    st = align_manifest(run, "tgt")["stats"]
    assert st["coverage"] == 1.0 and st["method_used"] == "identity"
    assert st["topk_mass"]["exact"] == pytest.approx(1.0)


def test_every_source_has_the_targets_blocks_and_vocabulary(aligned):
    run = aligned["run"]
    n_tgt = len(_tok("tgt"))
    tgt = load_capture(run, "tgt")
    blocks = read_blocks(run).to_pylist()
    for name in ("tgt", *SOURCES, "bper"):
        recs = list(iter_aligned(run, name))
        assert [r.hash for r in recs] == [b["hash"] for b in blocks]  # prepare order
        assert [r.domain for r in recs] == [b["domain"] for b in blocks]
        for r in recs:
            assert np.array_equal(r.input_ids, tgt[r.hash].token_ids)
            k = 10
            assert r.ids.shape == (r.n_positions, k) == r.logprobs.shape
            assert r.ids.dtype == np.int32 and r.logprobs.dtype == np.float32
            assert int(r.ids.max(initial=-1)) < n_tgt
            assert (r.ids[~r.valid] == -1).all() and np.isneginf(r.logprobs[~r.valid]).all()
            assert (r.gold[~r.valid] == 0).all() and (r.next_bytes[~r.valid] == 0).all()
            assert np.array_equal(r.ids < 0, np.isneginf(r.logprobs))
        val = list(iter_aligned(run, name, split="validation"))
        assert val and all(r.split == "validation" for r in val)
        assert [p.name for p in aligned_shards(run, name)][0] == "train-00000-000.parquet"


@pytest.mark.parametrize("name", ["spm", "wp"])
def test_valid_positions_are_the_offsets_alignment(aligned, name):
    run, texts = aligned["run"], aligned["texts"]
    s_surf, t_surf = vocab_surface(_tok(name)), vocab_surface(_tok("tgt"))
    src, tgt = load_capture(run, name), load_capture(run, "tgt")
    man = align_manifest(run, name)
    assert man["stats"]["method_used"] == "offsets"
    from fuselm.align.stage import load_or_build_vocab_map

    vmap, _, cached = load_or_build_vocab_map(run / "align", s_surf, t_surf, "mined")
    assert cached and vmap.fingerprint == man["components"]["vocab_map"]
    checked = 0
    for h, a in load_aligned(run, name).items():
        s, t, text = src[h], tgt[h], texts[h]
        s_sp = special_positions(s.token_ids, s.offsets, s_surf)
        t_sp = special_positions(t.token_ids, t.offsets, t_surf)
        s_nb = s_surf.text_nbytes()[s.token_ids]
        t_nb = t_surf.text_nbytes()[t.token_ids]
        m = align_offsets(
            s.offsets, t.offsets, s_sp, t_sp, text=text, src_nbytes=s_nb, tgt_nbytes=t_nb
        )[: a.n_positions]
        assert np.array_equal(a.valid, m >= 0)
        rows = m[a.valid]
        assert np.array_equal(a.gold[a.valid], s.gold[rows])
        ids, _, _ = remap_topk(s.ids[rows], s.logprobs[rows], vmap)
        for got, want in zip(a.ids[a.valid], ids, strict=True):
            assert set(got.tolist()) == set(want.tolist())
        # The boundary itself: the target token before position t ends (in bytes) where
        # the source token before position j ends, and both predict from there.
        t_end = token_byte_ends(text, t.offsets, t_sp, t_nb)
        s_end = token_byte_ends(text, s.offsets, s_sp, s_nb)
        tv = np.flatnonzero(a.valid)
        assert np.array_equal(t_end[tv], s_end[rows])
        assert np.array_equal(a.next_bytes[a.valid], s_end[rows + 1] - s_end[rows])
        checked += len(tv)
    assert checked > 50


def _matched(name: str, s, t, text: str) -> np.ndarray:
    """The alignment the stage uses for a source: offsets, or mined_dp for ``wpl``."""
    s_surf, t_surf = vocab_surface(_tok(name)), vocab_surface(_tok("tgt"))
    if name == "wpl":
        return align_mined_dp(
            TokenSeq.from_ids(s.token_ids, s_surf, s.offsets),
            TokenSeq.from_ids(t.token_ids, t_surf, t.offsets),
        )
    return align_offsets(
        s.offsets,
        t.offsets,
        special_positions(s.token_ids, s.offsets, s_surf),
        special_positions(t.token_ids, t.offsets, t_surf),
        text=text,
        src_nbytes=s_surf.text_nbytes()[s.token_ids],
        tgt_nbytes=t_surf.text_nbytes()[t.token_ids],
    )


@pytest.mark.parametrize("name", SOURCES)
def test_topk_mass_is_accounted_for(aligned, name):
    from fuselm.align.stage import load_or_build_vocab_map

    run = aligned["run"]
    src, tgt = load_capture(run, name), load_capture(run, "tgt")
    s_surf, t_surf = vocab_surface(_tok(name)), vocab_surface(_tok("tgt"))
    vmap, _, _ = load_or_build_vocab_map(run / "align", s_surf, t_surf, "mined")
    total = kept = lost = 0.0
    rows = 0
    for a in iter_aligned(run, name):  # every block, duplicated texts included
        s = src[a.hash]
        m = _matched(name, s, tgt[a.hash], aligned["texts"][a.hash])[: a.n_positions]
        assert np.array_equal(a.valid, m >= 0)
        for t in np.flatnonzero(a.valid):
            j = m[t]
            want = np.exp(s.logprobs[j].astype(np.float64))
            unm = vmap.src_to_tgt[s.ids[j]] < 0
            got = np.exp(a.logprobs[t].astype(np.float64)).sum()
            # mapped mass (summed where ids merged) + dropped mass = the teacher's top-k
            assert got + want[unm].sum() == pytest.approx(want.sum(), abs=0.01)
            assert got <= 1.0 + 0.01
            # ... and the record's tail holds the dropped mass and capture's own tail, so
            # entries + tail = 1: nothing is lost on the way to the loss.
            tail = np.exp(float(a.tail_logmass[t]))
            assert tail == pytest.approx(
                np.exp(float(s.tail_logmass[j])) + want[unm].sum(), abs=0.01
            )
            assert got + tail == pytest.approx(1.0, abs=0.02)
            total, kept, lost = total + want.sum(), kept + got, lost + want[unm].sum()
            rows += 1
    st = align_manifest(run, name)["stats"]
    frac = st["topk_mass"]
    assert frac["exact"] + frac["mined"] + frac["lost"] == pytest.approx(1.0)
    assert frac["lost"] == pytest.approx(lost / total, abs=1e-3)
    assert frac["lost"] < 0.05  # MinED maps every token with text; only specials are lost
    assert rows == st["valid_positions"] and kept > 0


def test_byte_counts_partition_each_block(aligned):
    run, texts = aligned["run"], aligned["texts"]
    for name in SOURCES:
        surf = vocab_surface(_tok(name))
        src = load_capture(run, name)
        for h, a in load_aligned(run, name).items():
            s, text = src[h], texts[h]
            sp = special_positions(s.token_ids, s.offsets, surf)
            ends = token_byte_ends(text, s.offsets, sp, surf.text_nbytes()[s.token_ids])
            # From the end of the first TEXT token: a source with a BOS/CLS predicts that
            # token, one without cannot; MinCE must not count it for some and not others.
            first_text = int(np.flatnonzero(~sp)[0])
            assert a.nll_bytes == len(text.encode()) - ends[first_text]
            assert a.next_bytes[a.valid].sum() <= a.nll_bytes
            assert np.isfinite(a.ce_per_byte())
        st = align_manifest(run, name)["stats"]
        recs = list(iter_aligned(run, name))
        ce = sum(r.nll_sum for r in recs) / sum(r.nll_bytes for r in recs)
        assert st["ce_nats_per_byte"] == pytest.approx(ce)


def test_normalising_tokenizer_falls_back_to_mined_dp(aligned):
    run = aligned["run"]
    st = align_manifest(run, "wpl")["stats"]
    assert st["method"] == "offsets" and st["method_used"] == "mined_dp"
    assert st["normalising"]["declared"]["source"]  # the lower-casing BertNormalizer
    assert "mined_dp (normalising tokenizer; offsets configured)" in aligned["printed"]
    surf, t_surf = vocab_surface(_tok("wpl")), vocab_surface(_tok("tgt"))
    src, tgt = load_capture(run, "wpl"), load_capture(run, "tgt")
    for h, a in load_aligned(run, "wpl").items():
        s, t = src[h], tgt[h]
        m = align_mined_dp(
            TokenSeq.from_ids(s.token_ids, surf, s.offsets),
            TokenSeq.from_ids(t.token_ids, t_surf, t.offsets),
        )
        assert np.array_equal(a.valid, m[: a.n_positions] >= 0)
    # The case-preserving WordPiece needs no fallback: its offsets cover the text.
    wp = align_manifest(run, "wp")["stats"]
    assert wp["method_used"] == "offsets"
    assert wp["normalising"]["blocks_offsets_not_covering_text"] == 0


def test_undeclared_normalisation_is_caught_per_block(aligned):
    run, texts = aligned["run"], aligned["texts"]
    st = align_manifest(run, "bper")["stats"]
    norm = st["normalising"]
    assert st["method_used"] == "offsets" and not norm["declared"]["source"]
    n_bad = sum(1 for a in iter_aligned(run, "bper") if "é" in texts[a.hash])
    assert norm["blocks_offsets_not_covering_text"] == n_bad > 0
    block_id, _, token, raw = norm["examples"][0]
    assert (token, raw) == ("e", "é") or "é" in raw
    assert f"+mined_dp on {n_bad} blocks" in aligned["printed"]
    surf, t_surf = vocab_surface(_tok("bper")), vocab_surface(_tok("tgt"))
    src, tgt = load_capture(run, "bper"), load_capture(run, "tgt")
    for a in iter_aligned(run, "bper"):
        s, t = src[a.hash], tgt[a.hash]
        if "é" in texts[a.hash]:  # those blocks: the verified DP
            m = align_mined_dp(
                TokenSeq.from_ids(s.token_ids, surf, s.offsets),
                TokenSeq.from_ids(t.token_ids, t_surf, t.offsets),
            )
        else:  # the others: offsets, identical to the target's own tokens
            m = np.arange(len(t.token_ids))
            m[-1] = -1
        assert np.array_equal(a.valid, m[: a.n_positions] >= 0)


def test_diagnostics_are_stored_and_printed(aligned):
    printed = aligned["printed"]
    for name in ("tgt", *SOURCES):
        st = align_manifest(aligned["run"], name)["stats"]
        for key in ("coverage", "one_to_one_share", "topk_mass", "top_unmapped", "method_used"):
            assert key in st
        assert 0.0 < st["coverage"] <= 1.0 and 0.0 <= st["one_to_one_share"] <= st["coverage"]
        assert all(isinstance(u["token"], str) and u["count"] > 0 for u in st["top_unmapped"])
        assert len(st["top_unmapped"]) <= 10
        assert st["blocks"] == read_blocks(aligned["run"]).num_rows > len(aligned["texts"])
        assert st["bytes_per_position"] > 0
        assert f"align {name} -> tgt [" in printed
    assert "coverage 100.0%" in printed.splitlines()[0]
    # shard metadata carries the per-shard figures the manifest sums
    meta = shard_metadata(aligned_shards(aligned["run"], "spm")[0])
    assert meta["source"] == "spm" and meta["diagnostics"]["blocks"] > 0


def test_rerun_skips_and_status_shows_done(aligned, capsys):
    run, cfg = aligned["run"], aligned["cfg"]
    before = {n: align_manifest(run, n)["finished"] for n in ("tgt", *SOURCES)}
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "align").rglob("*.parquet")}
    code, printed = _run("align", "-c", str(cfg), "-o", str(run))
    assert code == 0 and "align spm -> tgt" in printed  # summary again, from the manifest
    assert {n: align_manifest(run, n)["finished"] for n in before} == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("tgt", *SOURCES):
        line = next(ln for ln in out.splitlines() if f"align/{name} " in ln)
        assert " done" in line
    assert "align/vocab" not in out  # the vocabulary-map cache is not a stage


def test_changed_align_config_is_stale_and_force_redoes(aligned, tmp_path, capsys):
    run = _copy(aligned, tmp_path)
    cfg = str(aligned["cfg"])
    capsys.readouterr()
    code = main(["-q", "align", "-c", cfg, "-o", str(run), "align.method=mined_dp"])
    err = capsys.readouterr().err
    assert code == 1 and "align/spm" in err and "align.method" in err and "--force" in err
    code, printed = _run("align", "-c", cfg, "-o", str(run), "--force", "align.method=mined_dp")
    assert code == 0
    st = align_manifest(run, "spm")["stats"]
    assert st["method"] == st["method_used"] == "mined_dp"
    old = align_manifest(aligned["run"], "spm")["stats"]
    assert st["coverage"] < old["coverage"]  # the DP is verified, hence more conservative
    # The fallback is applied by the consumer: changing it makes nothing stale.
    assert (
        _run("align", "-c", cfg, "-o", str(run), "align.method=mined_dp", "align.fallback=mask")[0]
        == 0
    )


def test_resume_redoes_only_missing_shards(aligned, tmp_path):
    run = _copy(aligned, tmp_path)
    shards = aligned_shards(run, "wp")
    keep = {p: p.stat().st_mtime_ns for p in shards[1:]}
    shards[0].unlink()
    assert _run("align", "-c", str(aligned["cfg"]), "-o", str(run))[0] == 0
    assert shards[0].exists()
    assert {p: p.stat().st_mtime_ns for p in keep} == keep
    a, b = align_manifest(run, "wp")["stats"], align_manifest(aligned["run"], "wp")["stats"]
    for key in ("coverage", "one_to_one_share", "topk_mass", "top_unmapped", "valid_positions"):
        assert a[key] == b[key]


@pytest.mark.parametrize("case", ["unknown_text", "other_block"])
def test_hash_mismatch_is_refused_naming_source_and_block(aligned, tmp_path, capsys, case):
    import pyarrow.parquet as pq

    run = _copy(aligned, tmp_path)
    path = Stage(run, "capture/spm").shard_path("train-00000-001")
    table = pq.read_table(path)
    hashes = table["hash"].to_pylist()
    block_id = table["block_id"].to_pylist()[3]
    if case == "unknown_text":  # a text prepare never had
        bad = "0" * 32
    else:  # a text of another shard: the target's capture has no such block here
        bad = read_blocks(run, "validation")["hash"].to_pylist()[0]
    hashes[3] = bad
    table = table.set_column(table.schema.get_field_index("hash"), "hash", [hashes])
    table = table.replace_schema_metadata(pq.read_schema(path).metadata)
    write_parquet_atomic(path, table)
    capsys.readouterr()
    code = main(["-q", "align", "-c", str(aligned["cfg"]), "-o", str(run), "--force"])
    err = capsys.readouterr().err
    assert code == 1
    assert "'spm'" in err and block_id in err and bad in err
    assert ("not in the prepare output" if case == "unknown_text" else "capture/spm") in err


def test_target_not_a_source_is_tokenized_here(aligned, tmp_path):
    run = _copy(aligned, tmp_path)
    cfg = str(aligned["cfg"])
    args = ("align", "-c", cfg, "-o", str(run), "--force", "target.as_source=false")
    code, printed = _run(*args)
    assert code == 0 and "align tgt" not in printed
    for name in ("spm", "wp"):
        new, old = load_aligned(run, name), load_aligned(aligned["run"], name)
        assert new.keys() == old.keys()
        for h, a in new.items():
            b = old[h]
            assert np.array_equal(a.input_ids, b.input_ids)
            assert np.array_equal(a.valid, b.valid) and np.array_equal(a.ids, b.ids)
            assert np.array_equal(a.logprobs, b.logprobs)


def test_current_components_match_a_fresh_run(aligned):
    from fuselm.align.stage import current_components
    from fuselm.config import load_config

    run = aligned["run"]
    cfg = load_config(str(aligned["cfg"]), [])
    prep = Stage(run, "prepare").manifest()["fingerprint"]

    def cap_fp(m):
        return Stage(run, f"capture/{m.resolved_name()}").manifest()["fingerprint"]

    for name in ("tgt", *SOURCES):
        now = current_components(cfg, name, prep, cap_fp)
        assert now == align_manifest(run, name)["components"]
    cfg = load_config(str(aligned["cfg"]), ["align.vocab=exact"])
    assert current_components(cfg, "spm", prep, cap_fp) != align_manifest(run, "spm")["components"]
    assert current_components(cfg, "nope", prep, cap_fp) is None


def test_status_marks_alignments_stale(base_config, write_config, tmp_path, capsys):
    from fuselm.cli import main

    cfg = dict(base_config, sources=base_config["sources"][:1])
    cfg_path = write_config(cfg, "status.yaml")
    run_dir = tmp_path / "status-run"
    for stage in ("prepare", "capture", "align"):
        assert main([stage, "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    capsys.readouterr()
    main(["status", str(run_dir), "-c", str(cfg_path)])
    out = capsys.readouterr().out
    assert "align/spm" in out and "stale" not in out
    main(["status", str(run_dir), "-c", str(cfg_path), "align.vocab=exact"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "stale" in ln]
    # the target's own alignment is the identity whatever the vocabulary method
    assert {ln.split()[0] for ln in lines} == {"align/spm"}
