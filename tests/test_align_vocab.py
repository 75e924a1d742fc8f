"""Vocabulary maps (EM / MinED) and top-k remapping with mass accounting."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, models  # noqa: E402

from fuselm.align import VOCAB_METHODS, get_vocab_method  # noqa: E402
from fuselm.align.surface import to_text, vocab_surface  # noqa: E402
from fuselm.align.vocab import (  # noqa: E402
    KIND_EXACT,
    KIND_MINED,
    KIND_UNMAPPED,
    VocabMap,
    build_vocab_map,
    remap_topk,
    top_unmapped,
)
from fuselm.testing import FAMILIES, build_tokenizer  # noqa: E402

TOKS = {f: build_tokenizer(f) for f in FAMILIES}


def word_level(vocab: dict[str, int]) -> Tokenizer:
    """A plain tokenizer whose pieces are taken literally (family ``plain``)."""
    return Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))


def levenshtein(a: str, b: str) -> int:
    """Reference edit distance (independent of rapidfuzz)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_on_identical_tokenizers_is_identity(family):
    vmap = build_vocab_map(TOKS[family], TOKS[family], "exact")
    surf = vocab_surface(TOKS[family])
    text_ids = np.flatnonzero(~surf.special)
    assert (vmap.src_to_tgt[text_ids] == text_ids).all()
    assert (vmap.kind[text_ids] == KIND_EXACT).all()
    # Special tokens with a role map to themselves too; role-less ones stay unmapped.
    for sid in surf.roles:
        assert vmap.src_to_tgt[sid] == sid


def test_exact_matches_across_families_by_surface():
    src, tgt = TOKS["bpe"], TOKS["spm"]
    vmap = build_vocab_map(src, tgt, "exact")

    def mapped(piece: str) -> str | None:
        t = vmap.src_to_tgt[src.convert_tokens_to_ids(piece)]
        return tgt.convert_ids_to_tokens(int(t)) if t >= 0 else None

    assert mapped("Ġthe") == "▁the"
    # "\n" exists twice in the SentencePiece vocab: as the piece "\n" and as the byte
    # fallback <0x0A>; the map picks the piece the tokenizer actually emits.
    assert mapped("Ċ") == "\n"
    emitted = tgt.convert_ids_to_tokens(tgt("a\nb", add_special_tokens=False)["input_ids"])
    assert "\n" in emitted and "<0x0A>" not in emitted
    # "<|endoftext|>" is eos (and bos): maps by role to the target's eos "</s>".
    assert mapped("<|endoftext|>") == "</s>"
    counts = vmap.counts()
    assert counts["mined"] == 0 and counts["exact"] + counts["unmapped"] == len(vmap)


def test_mined_is_exact_first_then_true_minimum_with_lowest_id():
    src, tgt = TOKS["bpe"], TOKS["spm"]
    exact = build_vocab_map(src, tgt, "exact")
    mined = build_vocab_map(src, tgt, "mined")
    keep = exact.kind == KIND_EXACT
    assert (mined.src_to_tgt[keep] == exact.src_to_tgt[keep]).all()
    ss, ts = vocab_surface(src), vocab_surface(tgt)
    todo = np.flatnonzero(mined.kind == KIND_MINED)
    assert len(todo) > 50
    # Reference: brute force over every target form. A form held by several ids is
    # represented by the id the tokenizer emits (not a <0xNN> byte fallback), then the
    # lowest; ties between forms go to the lowest representative id.
    rep: dict[bytes, int] = {}
    for c in range(len(ts)):
        if ts.special[c] or not ts.forms[c]:
            continue
        fb = ts.pieces[c].startswith("<0x")
        r = rep.get(ts.forms[c])
        if r is None or (ts.pieces[r].startswith("<0x") and not fb):
            rep[ts.forms[c]] = c
    rng = np.random.default_rng(0)
    for sid in rng.choice(todo, size=40, replace=False):
        q = to_text(ss.forms[sid])
        dist = {f: levenshtein(q, to_text(f)) for f in rep}
        best = min(dist.values())
        got = int(mined.src_to_tgt[sid])
        assert dist[ts.forms[got]] == best, (ss.pieces[sid], ts.pieces[got])
        assert got == min(rep[f] for f, d in dist.items() if d == best)


def test_mined_tie_break_is_the_lowest_target_id_not_listing_order():
    src = word_level({"abc": 0, "zz": 1})
    # Three targets at distance 1 of "abc"; ids deliberately not in listing order.
    tgt = word_level({"abx": 2, "abd": 0, "ab": 1, "q": 3})
    vmap = build_vocab_map(src, tgt, "mined")
    assert vmap.src_to_tgt[0] == 0
    assert vmap.kind[0] == KIND_MINED
    tgt2 = word_level({"abx": 0, "abd": 2, "ab": 1, "q": 3})
    assert build_vocab_map(src, tgt2, "mined").src_to_tgt[0] == 0
    # "zz": "q" is at distance 2 and so are "ab"(1)...: the lowest id among them wins.
    d = {p: levenshtein("zz", p) for p in ("abx", "abd", "ab", "q")}
    best = min(d.values())
    ids = {"abx": 0, "abd": 2, "ab": 1, "q": 3}
    assert build_vocab_map(src, tgt2, "mined").src_to_tgt[1] == min(
        ids[p] for p, v in d.items() if v == best
    )


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="exact, mined"):
        build_vocab_map(TOKS["bpe"], TOKS["spm"], "fuzzy")
    with pytest.raises(ValueError, match="exact, mined"):
        get_vocab_method("nope")
    assert set(VOCAB_METHODS) == {"exact", "mined"}
    vmap = get_vocab_method("exact")(TOKS["bpe"], TOKS["bpe"])
    assert vmap.method == "exact"


def test_fingerprint_depends_on_both_tokenizers_and_method():
    a = build_vocab_map(TOKS["bpe"], TOKS["spm"], "exact")
    b = build_vocab_map(build_tokenizer("bpe"), build_tokenizer("spm"), "exact")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != build_vocab_map(TOKS["bpe"], TOKS["spm"], "mined").fingerprint
    assert a.fingerprint != build_vocab_map(TOKS["spm"], TOKS["bpe"], "exact").fingerprint
    other = build_tokenizer("bpe", vocab_size=500)
    assert a.fingerprint != build_vocab_map(other, TOKS["spm"], "exact").fingerprint


def toy_map() -> VocabMap:
    # source ids 0,1 -> target 0 (exact, mined); 2 -> 1 (exact); 3 unmapped.
    return VocabMap(
        src_to_tgt=np.array([0, 0, 1, -1], np.int32),
        kind=np.array([KIND_EXACT, KIND_MINED, KIND_EXACT, KIND_UNMAPPED], np.uint8),
        method="test",
        fingerprint="",
        tgt_size=2,
    )


def test_remap_sums_mass_on_shared_target_and_counts_lost_mass():
    p = np.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.25, 0.15, 0.1]])
    ids = np.array([[3, 0, 2, 1], [2, 3, 1, 0]])
    tids, tlp, stats = remap_topk(ids, np.log(p), toy_map())
    assert tids.dtype == np.int64 and tlp.dtype == np.float32
    # Row 0: ids 0 (.4) and 1 (.3) both land on target 0 -> .7; id 2 -> target 1 (.2).
    assert tids[0].tolist() == [0, 1, -1, -1]
    np.testing.assert_allclose(np.exp(tlp[0, :2]), [0.7, 0.2], rtol=1e-6)
    assert np.isneginf(tlp[0, 2:]).all()
    # Row 1: target 1 (.5) then target 0 (.15 + .1); id 3 (.25) is unmapped.
    assert tids[1].tolist() == [1, 0, -1, -1]
    np.testing.assert_allclose(np.exp(tlp[1, :2]), [0.5, 0.25], rtol=1e-6)
    assert stats.merged == 2 and stats.rows == 2
    np.testing.assert_allclose(stats.total, 2.0)
    np.testing.assert_allclose(stats.exact, 0.4 + 0.2 + 0.5 + 0.1)
    np.testing.assert_allclose(stats.mined, 0.3 + 0.15)
    np.testing.assert_allclose(stats.lost, 0.1 + 0.25)
    f = stats.fractions()
    assert math.isclose(f["exact"] + f["mined"] + f["lost"], 1.0)
    both = stats + stats
    assert math.isclose(both.lost, 2 * stats.lost) and both.rows == 4


def test_remap_rejects_ids_outside_the_map_and_ignores_empty_slots():
    with pytest.raises(ValueError, match="outside the vocabulary map"):
        remap_topk(np.array([[4]]), np.array([[0.0]]), toy_map())
    with pytest.raises(ValueError, match="must be equal"):
        remap_topk(np.array([[1, 2]]), np.array([[0.0]]), toy_map())
    tids, tlp, stats = remap_topk(np.array([[2, -1]]), np.array([[-0.5, 0.0]]), toy_map())
    assert tids.tolist() == [[1, -1]]
    np.testing.assert_allclose(stats.total, math.exp(-0.5))


def test_remap_is_exact_for_identity_map_on_real_shapes():
    rng = np.random.default_rng(1)
    vmap = build_vocab_map(TOKS["bpe"], TOKS["bpe"], "exact")
    ids = np.stack([rng.choice(np.arange(1, 600), 10, replace=False) for _ in range(64)])
    lp = np.log(rng.dirichlet(np.ones(10), size=64))
    tids, tlp, stats = remap_topk(ids, lp, vmap)
    assert (tids == ids).all()  # no merges: entries keep their slots
    np.testing.assert_allclose(tlp, lp, rtol=1e-6)
    assert stats.lost == 0 and stats.merged == 0


def test_top_unmapped_counts_occurrences_and_mass():
    surf = vocab_surface(word_level({"a": 0, "b": 1, "c": 2, "d": 3}))
    ids = np.array([[3, 3, 2], [3, 0, 1]])
    lp = np.log(np.array([[0.5, 0.1, 0.4], [0.2, 0.3, 0.5]]))
    out = top_unmapped(toy_map(), surf, ids, lp)
    assert out == [("d", 3, pytest.approx(0.8))]
