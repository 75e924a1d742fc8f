"""Capture stage: top-k fidelity against a direct forward, offsets, padded vocabularies,
storage round trip and size, resume/skip, and every bad input of issue #3."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fuselm.artifacts import Stage, StageError, write_parquet_atomic
from fuselm.capture import capture_manifest, capture_shards, iter_capture, load_capture, storage
from fuselm.capture.compute import NonFiniteLogitsError, topk_logprobs
from fuselm.capture.runner import Block, Capturer
from fuselm.capture.stage import plan_shards, run_capture
from fuselm.cli import main
from fuselm.config import load_config
from fuselm.corpus import read_blocks
from fuselm.testing import FIXTURE_TEXTS, build_tokenizer, save_tiny_model

TOL = storage.STEP / 2 + 1e-5  # quantisation error bound (< 0.01 nat)

# source name -> (tokenizer family, architecture, embedding rows or None)
SOURCES = {
    "tgt": ("bpe", "llama", None),
    "spm": ("spm", "gpt2", None),
    "wp": ("wordpiece", "llama", None),
    "wpl": ("wordpiece_lower", "gpt2", None),
    "pad": ("bpe", "llama", 640),
}


# ----------------------------------------------------------------------------- fixtures


def _write_corpus(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for i, text in enumerate(FIXTURE_TEXTS):
        (data / f"doc{i}.txt").write_text(text * 2, encoding="utf-8")
    code = (Path(sysconfig.get_paths()["stdlib"]) / "colorsys.py").read_text(encoding="utf-8")
    (data / "colorsys.py").write_text(code[:2500], encoding="utf-8")
    return data


def _config(root: Path, models: dict[str, Path], data: Path, **capture) -> dict:
    names = list(models)
    return {
        "corpus": {
            "inputs": [{"path": str(data)}],
            "block_tokens": 40,
            "validation_fraction": 0.25,
            "blocks_per_shard": 7,
        },
        "target": {"model": str(models[names[0]]), "name": names[0]},
        "sources": [{"model": str(models[n]), "name": n} for n in names[1:]],
        "capture": {"blocks_per_shard": 4, "batch_tokens": 100, **capture},
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("capture-models")
    return {
        name: save_tiny_model(
            root / name, build_tokenizer(fam), arch=arch, vocab_rows=rows, max_positions=128
        )
        for name, (fam, arch, rows) in SOURCES.items()
    }


@pytest.fixture(scope="module")
def captured(tmp_path_factory, models) -> dict:
    """One prepare + capture over five teachers (shared by the read-only tests)."""
    root = tmp_path_factory.mktemp("capture-run")
    data = _write_corpus(root)
    cfg_path = root / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root, models, data)), encoding="utf-8")
    run_dir = root / "run"
    assert main(["-q", "prepare", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    assert main(["-q", "capture", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    return {"root": root, "cfg": cfg_path, "run": run_dir, "data": data}


def _copy_run(captured: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(captured["run"], run)
    return run


def _direct(model_dir: Path, token_ids: np.ndarray, vocab: int):
    """float64 log-softmax over the real vocabulary of a plain forward: (P, V)."""
    model = _model(model_dir)
    with torch.inference_mode():
        logits = model(torch.tensor([token_ids.tolist()]), use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.double()[:, :vocab], dim=-1)


_MODELS: dict[str, torch.nn.Module] = {}


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    if str(path) not in _MODELS:
        _MODELS[str(path)] = AutoModelForCausalLM.from_pretrained(path).eval()
    return _MODELS[str(path)]


# ----------------------------------------------------------------------------- compute (pure)


def _reference(logits: torch.Tensor, k: int, vocab: int, gold: torch.Tensor):
    lp = torch.log_softmax(logits.double()[:, :vocab], dim=-1)
    v, i = torch.topk(lp, k, dim=-1)
    rest = lp.exp().scatter(1, i, 0.0).sum(-1).log()
    return v, i, lp.gather(1, gold[:, None])[:, 0], rest


@pytest.mark.parametrize(
    "rows,vocab,chunk",
    [(3000, 3000, None), (3000, 2950, 7), (5000, 4999, 64), (700, 650, None), (12, 12, 5)],
)
def test_topk_matches_log_softmax_topk(rows, vocab, chunk):
    # Large vocabularies take the grouped search (with a remainder group), small ones the
    # plain top-k; both must equal torch.topk(log_softmax(x)) exactly in ids.
    g = torch.Generator().manual_seed(rows + vocab)
    logits = torch.randn(37, rows, generator=g) * 4
    gold = torch.randint(0, vocab, (37,), generator=g)
    k = 10
    res = topk_logprobs(logits, k, gold_ids=gold, vocab_size=vocab, chunk_rows=chunk)
    v, i, gl, tail = _reference(logits, k, vocab, gold)
    assert torch.equal(res.ids, i)
    assert torch.allclose(res.logprobs.double(), v, atol=1e-5)
    assert torch.allclose(res.gold.double(), gl, atol=1e-5)
    assert torch.allclose(res.tail_logmass.double(), tail, atol=1e-4)
    assert int(res.ids.max()) < vocab
    if vocab < rows:
        full = torch.log_softmax(logits.double(), dim=-1)
        pad_mass = full[:, vocab:].exp().sum(-1)
        assert torch.allclose(res.pad_logmass.double().exp(), pad_mass, atol=1e-6)
    else:
        assert torch.isneginf(res.pad_logmass).all()


def test_topk_tail_is_accurate_when_topk_holds_almost_everything():
    logits = torch.full((3, 4000), -30.0)
    logits[:, :10] = torch.linspace(10, 5, 10)  # the rest holds ~1e-13 of the mass
    res = topk_logprobs(logits, 10)
    expected = torch.log_softmax(logits.double(), -1)[:, 10:].exp().sum(-1).log()
    # 1 - sum(p_topk) would be 0 (or noise) in float32; the direct sum is exact.
    assert torch.allclose(res.tail_logmass.double(), expected, atol=1e-3)
    assert torch.isneginf(topk_logprobs(logits[:, :10], 10).tail_logmass).all()


def test_topk_bf16_and_head_paths_agree():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(23, 16, generator=g)
    head = torch.nn.Linear(16, 3100, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3100, 16, generator=g))
        logits = head(hidden)
    gold = torch.randint(0, 3000, (23,), generator=g)
    plain = topk_logprobs(logits, 8, gold_ids=gold, vocab_size=3000)
    with torch.no_grad():
        fused = topk_logprobs(hidden, 8, gold_ids=gold, vocab_size=3000, chunk_rows=6, head=head)
    assert torch.equal(plain.ids, fused.ids)
    assert torch.allclose(plain.logprobs, fused.logprobs, atol=1e-4)
    assert torch.allclose(plain.pad_logmass, fused.pad_logmass, atol=1e-4)
    half = topk_logprobs(logits.bfloat16(), 8, gold_ids=gold, vocab_size=3000)
    ref = torch.log_softmax(logits.bfloat16().double()[:, :3000], -1)
    assert torch.allclose(half.logprobs.double(), torch.topk(ref, 8, -1).values, atol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_topk_non_finite_names_the_row(bad):
    logits = torch.randn(9, 50)
    logits[4, 17] = bad
    with pytest.raises(NonFiniteLogitsError) as e:
        topk_logprobs(logits, 5, chunk_rows=3)
    assert e.value.row == 4
    logits = torch.randn(3, 50)
    logits[2] = float("-inf")  # no finite logit at all
    with pytest.raises(NonFiniteLogitsError):
        topk_logprobs(logits, 5)


def test_topk_validates_arguments():
    with pytest.raises(ValueError, match="k=20"):
        topk_logprobs(torch.randn(2, 10), 20)
    with pytest.raises(ValueError, match="gold id"):
        topk_logprobs(torch.randn(2, 10), 3, gold_ids=torch.tensor([1, 9]), vocab_size=8)
    assert topk_logprobs(torch.randn(0, 10), 3).ids.shape == (0, 3)


# ----------------------------------------------------------------------------- storage


def _random_block(rng, t: int, k: int = 10, vocab: int = 2**17):
    p = max(t - 1, 0)
    lp = -np.cumsum(rng.exponential(0.8, (p, k)), axis=1)
    lp[rng.random((p, k)) < 0.01] = -np.inf  # fewer than k finite entries
    lp = -np.sort(-lp, axis=1)
    lengths = rng.integers(0, 9, t)
    gaps = rng.integers(-3, 3, t)  # overlaps (split characters) and (0, 0) specials
    ends = np.maximum.accumulate(np.cumsum(gaps + lengths).clip(min=0))
    starts = np.maximum(ends - lengths, 0)
    return dict(
        block_id=f"doc#{t}",
        block_hash=f"{t:032x}",
        token_ids=rng.integers(0, vocab, t),
        offsets=np.stack([starts, ends], axis=1),
        ids=rng.integers(0, vocab, (p, k)),
        logprobs=lp,
        gold=np.minimum(-rng.exponential(3.0, p), 0.0),
        tail_logmass=np.log(rng.uniform(1e-9, 1.0, p)),
        text_roundtrip=bool(t % 2),
    )


@pytest.mark.parametrize("t", [0, 1, 2, 57, 700])
def test_storage_round_trip(t):
    rng = np.random.default_rng(t)
    src = _random_block(rng, t)
    row = storage.encode_block(**src)
    blk = storage.decode_row(row, 10)
    assert blk.hash == src["block_hash"] and blk.block_id == src["block_id"]
    assert blk.text_roundtrip == src["text_roundtrip"]
    assert np.array_equal(blk.token_ids, src["token_ids"])  # lossless
    assert np.array_equal(blk.offsets, src["offsets"])
    assert np.array_equal(blk.ids, src["ids"])
    assert blk.ids.dtype == np.int32 and blk.logprobs.dtype == np.float32
    for got, want in (
        (blk.logprobs, src["logprobs"]),
        (blk.gold, src["gold"]),
        (blk.tail_logmass, src["tail_logmass"]),
    ):
        assert got.shape == np.shape(want)
        assert np.array_equal(np.isneginf(got), np.isneginf(want))
        fin = np.isfinite(want)
        assert np.all(np.abs(got[fin] - want[fin]) <= TOL)
        assert np.all(np.abs(got[fin] - want[fin]) < 0.01)


def test_storage_refuses_what_it_cannot_store():
    rng = np.random.default_rng(0)
    src = _random_block(rng, 5)
    with pytest.raises(ValueError, match="sorted"):
        storage.encode_block(**{**src, "logprobs": src["logprobs"][:, ::-1] - 1})
    with pytest.raises(ValueError, match="NaN"):
        storage.encode_block(**{**src, "gold": np.full(4, np.nan)})
    with pytest.raises(ValueError, match="2\\^32"):
        storage.encode_block(**{**src, "token_ids": np.array([0, 1, 2, 3, 2**33])})
    assert storage.quantize(np.array([-5000.0]))[0] == storage.MAX_CODE  # clamped, not -inf


def test_storage_budget_holds_for_worst_case_ids(tmp_path):
    # Uniformly random ids over 2^17 are incompressible (17 bits each): the format must
    # still stay under the 40 bytes per position at k = 10, all columns included.
    rng = np.random.default_rng(0)
    rows = [storage.encode_block(**_random_block(rng, 1024)) for _ in range(4)]
    path = write_parquet_atomic(
        tmp_path / "x.parquet", storage.to_table(rows, 10), **storage.parquet_options()
    )
    assert path.stat().st_size / (4 * 1023) <= 40


# ----------------------------------------------------------------------------- the stage


def test_manifest_and_reader_api(captured):
    run = captured["run"]
    blocks = read_blocks(run).to_pylist()
    for name, (fam, _, rows) in SOURCES.items():
        man = capture_manifest(run, name)
        st = man["stats"]
        tok = build_tokenizer(fam)
        assert st["blocks"] == len(blocks)
        assert st["top_k"] == 10 and st["bos"] == "auto"
        assert st["bytes"] == sum(s["bytes"] for s in man["shards"])
        assert st["bytes_per_position"] == pytest.approx(st["bytes"] / st["positions"], abs=1e-3)
        assert st["vocab_size"] == len(tok) and st["embedding_rows"] == (rows or len(tok))
        assert st["bos_added"] == (fam == "spm")  # the SentencePiece family adds <s>
        caps = list(iter_capture(run, name))
        assert [c.hash for c in caps] == [b["hash"] for b in blocks]  # prepare order
        assert sum(c.n_positions for c in caps) == st["positions"]
        assert st["tokens"] == sum(len(c.token_ids) for c in caps)
    shards = capture_shards(run, "tgt")
    # shard names derive from the prepare shards (7 blocks) and capture.blocks_per_shard (4)
    assert [p.name for p in shards][:2] == ["train-00000-000.parquet", "train-00000-001.parquet"]
    val = capture_shards(run, "tgt", split="validation")
    assert val and all(p.name.startswith("validation-") for p in val)
    by_hash = load_capture(run, "tgt", split="validation")
    assert set(by_hash) == {b["hash"] for b in blocks if b["split"] == "validation"}


@pytest.mark.parametrize("name", list(SOURCES))
def test_stored_topk_equals_direct_forward(captured, models, name):
    fam, _, _ = SOURCES[name]
    tok = build_tokenizer(fam)
    blocks = {b["hash"]: b for b in read_blocks(captured["run"]).to_pylist()}
    vocab = len(tok)
    checked = 0
    for cap in list(iter_capture(captured["run"], name))[:12]:
        text = blocks[cap.hash]["text"]
        enc = tok(text, return_offsets_mapping=True)  # auto BOS: the tokenizer's own
        assert cap.token_ids.tolist() == enc["input_ids"]
        if cap.n_positions == 0:
            continue
        lp = _direct(models[name], cap.token_ids, vocab)
        v, i = torch.topk(lp, 10, dim=-1)
        assert np.array_equal(cap.ids, i.numpy())  # exact ids, descending
        assert np.abs(cap.logprobs - v.numpy()).max() <= TOL
        gold = lp.gather(1, torch.from_numpy(cap.token_ids[1:]).long()[:, None])[:, 0]
        assert np.abs(cap.gold - gold.numpy()).max() <= TOL
        tail = lp.exp().scatter(1, i, 0.0).sum(-1).log()
        assert np.abs(cap.tail_logmass - tail.numpy()).max() <= TOL + 1e-4
        checked += 1
    assert checked >= 5


def _byte_symbols() -> dict[str, int]:
    # GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other
    # bytes are shifted to code points 256, 257, ... in byte order.
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_symbols()


def _surface(fam: str, tok, token_id: int) -> bytes | str:
    piece = tok.convert_ids_to_tokens(token_id)
    if fam == "bpe":  # byte-level symbols -> the raw bytes they stand for
        return bytes(_BYTE_OF[c] for c in piece)
    if fam == "spm":
        if piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:-1], 16)])
        return piece.replace("▁", " ")
    return piece.removeprefix("##")


@pytest.mark.parametrize("name", ["tgt", "spm", "wp", "wpl"])
def test_offsets_map_every_token_to_its_text(captured, name):
    fam = SOURCES[name][0]
    tok = build_tokenizer(fam)
    blocks = {b["hash"]: b["text"] for b in read_blocks(captured["run"]).to_pylist()}
    norm = tok.backend_tokenizer.normalizer
    specials = set(tok.all_special_ids)
    n = 0
    for cap in iter_capture(captured["run"], name):
        text = blocks[cap.hash]
        enc = tok(text, return_offsets_mapping=True)
        assert np.array_equal(cap.offsets, np.asarray(enc["offset_mapping"]).reshape(-1, 2))
        if fam in ("bpe", "wordpiece_lower"):  # byte-level: exact; lower-casing: never
            assert cap.text_roundtrip == (fam == "bpe")
        for tid, (s, e) in zip(cap.token_ids.tolist(), cap.offsets.tolist(), strict=True):
            assert 0 <= s <= e <= len(text)
            if tid == tok.unk_token_id:
                continue
            if tid in specials:  # added specials (<s>, [CLS], [SEP]) have no text
                assert (s, e) == (0, 0)
                continue
            span = text[s:e]
            sur = _surface(fam, tok, tid)
            if isinstance(sur, bytes):
                # A piece of a split UTF-8 character: the span is the whole character.
                assert sur in span.encode() and len(span.encode()) - len(sur) <= 6, (sur, span)
            elif fam == "wordpiece_lower":  # normalised: e.g. Hangul splits into jamo
                assert sur and sur in norm.normalize_str(span), (sur, span)
            elif fam == "spm" and sur == " " and s == 0:
                pass  # the prepended "▁" is not in the text: it borrows the first character
            else:
                assert sur == span or sur.lstrip() == span.lstrip(), (sur, span)
            n += 1
    assert n > 100


def test_padded_vocabulary_is_renormalised_over_real_tokens(captured):
    man = capture_manifest(captured["run"], "pad")
    st = man["stats"]
    assert st["padded_vocab"] is True and st["renormalised_over_real_vocab"] is True
    assert st["embedding_rows"] == 640 and st["vocab_size"] == 600
    assert 0.0 < st["padded_mass_mean"] < 1.0  # a random model puts mass on padding rows
    for cap in iter_capture(captured["run"], "pad"):
        assert cap.ids.size == 0 or int(cap.ids.max()) < 600
        if cap.n_positions:  # top-k + tail = 1 over the real tokens only
            lp = cap.logprobs.astype(np.float64)
            total = np.exp(lp).sum(1) + np.exp(cap.tail_logmass.astype(np.float64))
            assert np.allclose(total, 1.0, atol=0.02)
    assert capture_manifest(captured["run"], "tgt")["stats"]["padded_vocab"] is False


def test_batching_does_not_change_the_capture(models):
    # Length-bucketed, right-padded batches without attention mask == one block at a time;
    # and the fused (chunked output layer) path == the plain one.
    tok = build_tokenizer("spm")
    model = _model(models["spm"])
    blocks = [Block(f"d#{i}", f"{i:032x}", t) for i, t in enumerate(FIXTURE_TEXTS)]
    outs = []
    for batch_tokens, fused in ((1, False), (10_000, False), (150, True)):
        cap = Capturer(model, tok, name="spm", top_k=7, batch_tokens=batch_tokens, fused_head=fused)
        assert cap.fused_head == fused
        outs.append([storage.decode_row(r, 7) for r in cap.capture(blocks)])
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.token_ids, b.token_ids)
            assert np.abs(a.logprobs - b.logprobs).max() <= storage.STEP


def test_batches_bucket_by_length_within_the_budget(models):
    tok = build_tokenizer("bpe")
    cap = Capturer(_model(models["tgt"]), tok, name="tgt", batch_tokens=100)
    lengths = [5, 90, 33, 33, 120, 2, 60, 31, 30]
    batches = list(cap.batches(lengths))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 100
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert [4] in batches  # longer than the budget: alone, never truncated


def test_bos_policies(models):
    tok = build_tokenizer("spm")  # adds <s> by default
    model = _model(models["spm"])
    text = [FIXTURE_TEXTS[0]]
    auto = Capturer(model, tok, name="s", bos="auto").encode(text)[0]
    add = Capturer(model, tok, name="s", bos="add").encode(text)[0]
    none = Capturer(model, tok, name="s", bos="none").encode(text)[0]
    assert auto[0][0] == add[0][0] == tok.bos_token_id != none[0][0]
    assert np.array_equal(auto[0], add[0]) and np.array_equal(auto[0][1:], none[0])
    assert tuple(add[1][0]) == (0, 0)
    bpe = build_tokenizer("bpe")
    added = Capturer(_model(models["tgt"]), bpe, name="t", bos="add").encode(text)[0][0]
    assert added[0] == bpe.bos_token_id
    wp = build_tokenizer("wordpiece")  # no BOS token at all
    with pytest.raises(StageError, match="no BOS token"):
        Capturer(_model(models["wp"]), wp, name="wp", bos="add")


def test_rerun_skips_and_a_deleted_shard_is_redone_alone(captured, tmp_path):
    run = _copy_run(captured, tmp_path)
    cfg = load_config(captured["cfg"])
    stage = Stage(run, "capture/spm")
    files = sorted(stage.path.glob("*.parquet"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    man_before = stage.manifest()
    out = run_capture(cfg, run)  # everything up to date: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in files} == {k: v[0] for k, v in before.items()}
    assert out["sources"]["spm"]["finished"] == man_before["finished"]

    victim = files[len(files) // 2]
    victim.unlink()
    run_capture(cfg, run)
    assert victim.exists() and victim.read_bytes() == before[victim.name][1]  # deterministic
    for p in files:
        if p != victim:
            assert p.stat().st_mtime_ns == before[p.name][0], p.name  # untouched
    assert stage.manifest()["stats"] == man_before["stats"]


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_with_missing_shards_only(captured, models, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(captured["run"] / "prepare", run / "prepare")
    shutil.copy(captured["run"] / "fuselm-run.json", run / "fuselm-run.json")
    cfg = load_config(captured["cfg"], ["target.as_source=false"])
    cfg.sources = [s for s in cfg.sources if s.name == "spm"]
    calls = []
    real = Capturer.capture
    kill = [True]

    def flaky(self, blocks, on_batch=None):
        calls.append(blocks[0].block_id)
        if kill[0] and len(calls) == 3:
            raise _Killed  # the process dies mid-run
        return real(self, blocks, on_batch)

    monkeypatch.setattr(Capturer, "capture", flaky)
    with pytest.raises(_Killed):
        run_capture(cfg, run)
    stage = Stage(run, "capture/spm")
    assert stage.manifest() is None and stage.pending() is not None
    done = sorted(p.name for p in stage.path.glob("*.parquet"))
    assert len(done) == 2
    calls.clear()
    kill[0] = False
    run_capture(cfg, run)
    n_shards = len(plan_shards(run, cfg.capture.blocks_per_shard))
    assert len(calls) == n_shards - 2  # only what was missing
    assert stage.manifest()["stats"] == capture_manifest(captured["run"], "spm")["stats"]


def test_changed_config_is_an_error_naming_the_field(captured, tmp_path, capsys):
    run = _copy_run(captured, tmp_path)
    code = main(["capture", "-c", str(captured["cfg"]), "-o", str(run), "capture.top_k=5"])
    assert code == 1
    err = capsys.readouterr().err
    assert "capture.top_k: 10 -> 5" in err and "--force" in err


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, models) -> dict[str, Path]:
    """Models that must be refused, each with a clear message."""
    from transformers import ByT5Tokenizer, DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("bad-models")
    bpe = build_tokenizer("bpe")
    out = {}
    # not a causal LM: an encoder
    enc = root / "encoder"
    DistilBertModel(
        DistilBertConfig(vocab_size=600, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    ).save_pretrained(enc)
    bpe.save_pretrained(enc)
    out["encoder"] = enc
    # slow tokenizer without offsets (and no converter)
    slow = root / "slow"
    save_tiny_model(slow, bpe, vocab_rows=400)
    for f in slow.glob("tokenizer*"):
        f.unlink()
    ByT5Tokenizer().save_pretrained(slow)
    out["slow"] = slow
    # NaN in the output layer
    nan = root / "nan"
    save_tiny_model(nan, bpe)
    from safetensors.torch import load_file, save_file

    sd = load_file(nan / "model.safetensors")
    sd["lm_head.weight"][7] = float("nan")
    save_file(sd, nan / "model.safetensors", metadata={"format": "pt"})
    out["nan"] = nan
    # custom architecture that needs its own code
    remote = root / "remote"
    shutil.copytree(models["tgt"], remote)
    (remote / "config.json").write_text(
        '{"model_type": "fancy_lm", "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig",'
        ' "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}, "vocab_size": 600}'
    )
    (remote / "configuration_fancy.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass FancyConfig(LlamaConfig):\n"
        "    model_type = 'fancy_lm'\n"
    )
    out["remote"] = remote
    # weights only as a pickle
    pkl = root / "pickle"
    shutil.copytree(models["tgt"], pkl)
    from safetensors.torch import load_file as lf

    torch.save(lf(pkl / "model.safetensors"), pkl / "pytorch_model.bin")
    (pkl / "model.safetensors").unlink()
    out["pickle"] = pkl
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, models) -> dict:
    """A finished prepare stage (target only) that bad-source captures run against."""
    root = tmp_path_factory.mktemp("bad-run")
    data = _write_corpus(root)
    cfg = _config(root, {"tgt": models["tgt"]}, data)
    cfg_path = root / "base.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["-q", "prepare", "-c", str(cfg_path), "-o", str(root / "run")]) == 0
    return {"root": root, "cfg": cfg, "run": root / "run"}


def _capture_with(prepared, tmp_path, source: dict, capsys) -> tuple[int, str]:
    cfg = dict(prepared["cfg"])
    cfg["target"] = {**cfg["target"], "as_source": False}
    cfg["sources"] = [source]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run = tmp_path / "run"
    shutil.copytree(prepared["run"], run)
    capsys.readouterr()
    code = main(["-q", "capture", "-c", str(path), "-o", str(run)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case,source,expected",
    [
        ("missing", {"model": "/nonexistent/models/llama"}, ["does not exist", "model:"]),
        ("encoder", {}, ["not a causal language model", "distilbert"]),
        ("slow", {}, ["slow (Python) tokenizer", "tokenizer.json"]),
        ("context", {"max_context": 8}, ["context is 8", "tokens", "block_tokens"]),
        ("nan", {}, ["non-finite logits", "block", "#"]),
        ("remote", {}, ["trust_remote_code: true"]),
        ("pickle", {}, ["pickle", "allow_pickle: true", "safetensors"]),
    ],
)
def test_bad_input_gives_a_clear_error(
    case, source, expected, bad_models, models, prepared, tmp_path, capsys
):
    path = bad_models.get(case, models["tgt"])
    src = {"model": str(path), "name": f"bad-{case}", **source}
    code, err = _capture_with(prepared, tmp_path, src, capsys)
    assert code == 1, err
    assert f"bad-{case}" in err  # names the source
    for word in expected:
        assert word in err, (word, err)
    assert "Traceback" not in err


def test_pickle_weights_load_when_allowed(bad_models, prepared, tmp_path, capsys):
    src = {"model": str(bad_models["pickle"]), "name": "pkl", "allow_pickle": True}
    code, err = _capture_with(prepared, tmp_path, src, capsys)
    assert code == 0, err
    assert capture_manifest(tmp_path / "run", "pkl")["stats"]["positions"] > 0


def test_no_prepare_or_no_models_is_an_error(models, tmp_path):
    cfg = load_config(None, [f"target.model={models['tgt']}"])
    with pytest.raises(StageError, match="fuselm prepare"):
        run_capture(cfg, tmp_path)
    with pytest.raises(StageError, match="no models"):
        run_capture(load_config(None), tmp_path)


def test_world_size_without_launcher_is_explained(captured, tmp_path, monkeypatch):
    run = _copy_run(captured, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(StageError, match="torchrun"):
        run_capture(load_config(captured["cfg"]), run)


def test_shard_plan_is_independent_of_processes(captured):
    plans = plan_shards(captured["run"], 4)
    assert len({p.name for p in plans}) == len(plans)
    assert all(0 < p.stop - p.start <= 4 for p in plans)
    total = sum(p.stop - p.start for p in plans)
    assert total == read_blocks(captured["run"]).num_rows
    assert total == capture_manifest(captured["run"], "tgt")["stats"]["blocks"]
    assert plans[0].prepare_file.name.startswith("train-")


class _SlowStandIn:
    """A slow tokenizer as transformers would load one: no offsets, ``is_fast`` False."""

    is_fast = False

    def __init__(self, fast, shift: int = 0) -> None:
        self._fast, self._shift = fast, shift
        self.bos_token, self.eos_token = fast.bos_token, fast.eos_token
        self.unk_token, self.pad_token = fast.unk_token, fast.pad_token

    def __call__(self, text, **kw):
        return {"input_ids": [i + self._shift for i in self._fast(text, **kw)["input_ids"]]}


def test_slow_tokenizer_is_converted_when_faithful(monkeypatch):
    import importlib

    from fuselm.config import ModelConfig
    from fuselm.models import ModelLoadError, ensure_fast_tokenizer

    # (the package attribute of that name is the function, not the module)
    conv = importlib.import_module("transformers.convert_slow_tokenizer")
    fast = build_tokenizer("bpe")
    monkeypatch.setattr(conv, "convert_slow_tokenizer", lambda t: t._fast.backend_tokenizer)
    m = ModelConfig(model="/x", name="slowsrc")
    converted, did = ensure_fast_tokenizer(m, _SlowStandIn(fast))
    assert did and converted.is_fast
    enc = converted(FIXTURE_TEXTS[2], return_offsets_mapping=True)
    assert enc["input_ids"] == fast(FIXTURE_TEXTS[2])["input_ids"] and enc["offset_mapping"]
    with pytest.raises(ModelLoadError, match="slowsrc.*encodes text differently"):
        ensure_fast_tokenizer(m, _SlowStandIn(fast, shift=1))
    assert ensure_fast_tokenizer(m, fast) == (fast, False)


def test_device_and_dtype_resolution():
    from fuselm.models import resolve_device, resolve_dtype

    dev = resolve_device("auto", local_rank=1)
    if torch.cuda.is_available():  # one GPU per rank under torchrun
        assert str(dev) == "cuda:1" and resolve_dtype("auto", dev) in (
            torch.bfloat16,
            torch.float32,
        )
    else:
        assert dev.type == "cpu" and resolve_dtype("auto", dev) == torch.float32
    assert resolve_dtype("bfloat16", dev) == torch.bfloat16
    assert str(resolve_device("cpu")) == "cpu"


def test_bfloat16_weights_capture_close_to_float32(models):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer("bpe")
    blocks = [Block(f"d#{i}", f"{i:032x}", t) for i, t in enumerate(FIXTURE_TEXTS[:4])]
    ref = Capturer(_model(models["tgt"]), tok, name="f32").capture(blocks)
    half = AutoModelForCausalLM.from_pretrained(models["tgt"], dtype=torch.bfloat16).eval()
    got = Capturer(half, tok, name="bf16").capture(blocks)
    for a, b in zip(ref, got, strict=True):
        x, y = storage.decode_row(a, 10), storage.decode_row(b, 10)
        assert np.array_equal(x.token_ids, y.token_ids)
        assert np.abs(x.logprobs[:, 0] - y.logprobs[:, 0]).max() < 0.1  # bf16 rounding


def test_status_marks_capture_stale_when_the_corpus_changes(
    base_config, write_config, corpus_dir, tmp_path, capsys
):
    from fuselm.cli import main

    cfg = dict(base_config, sources=base_config["sources"][:1])
    cfg_path = write_config(cfg)
    run_dir = tmp_path / "run"
    assert main(["capture", "-c", str(cfg_path), "-o", str(run_dir)]) == 1  # no prepare yet
    assert main(["prepare", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    assert main(["capture", "-c", str(cfg_path), "-o", str(run_dir)]) == 0
    capsys.readouterr()
    main(["status", str(run_dir), "-c", str(cfg_path)])
    out = capsys.readouterr().out
    assert "capture/spm" in out and "stale" not in out
    (corpus_dir / "code" / "this.py").write_text("print('edited')\n")
    main(["status", str(run_dir), "-c", str(cfg_path)])
    out = capsys.readouterr().out
    assert out.count("stale") >= 3  # prepare and both captures
