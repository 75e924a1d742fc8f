"""Property tests of the fusion functions (fuselm.fuse)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm.fuse import (
    FUSION_FUNCTIONS,
    avg_ce,
    blend_with_gold,
    fill_fallback,
    get_fusion,
    min_ce,
    per_byte_ce,
    stack_sources,
)

SETTINGS = settings(max_examples=25, deadline=None, database=None)


def make_sources(seed: int, S: int, B: int, T: int, K: int, V: int, pad: bool = False):
    """Random aligned sources: distinct ids per row, true (tail-leaving) log-probs."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(S, B, T, V, generator=g).mul(2).log_softmax(-1)  # (S, B, T, V)
    ids = torch.rand(S, B, T, V, generator=g).argsort(-1)[..., :K]  # (S, B, T, K)
    lp = full.gather(-1, ids)
    if pad:  # random number of padding columns at the end of each row
        n_real = torch.randint(1, K + 1, (S, B, T, 1), generator=g)
        is_pad = torch.arange(K) >= n_real
        ids = ids.masked_fill(is_pad, -1)
        lp = lp.masked_fill(is_pad, float("-inf"))
    valid = torch.ones(S, B, T, dtype=torch.bool)
    gold = -torch.rand(S, B, T, generator=g) * 4  # (S, B, T)
    nbytes = torch.randint(1, 5, (S, B, T), generator=g)
    return ids, lp, valid, gold, nbytes


def densify(ids: torch.Tensor, lp: torch.Tensor, V: int) -> torch.Tensor:
    """(..., K) sparse log-probs -> (..., V) probabilities (test-only reference)."""
    p = torch.where(ids >= 0, lp.exp(), 0.0)
    return torch.zeros(*ids.shape[:-1], V, dtype=torch.float64).scatter_add(
        -1, ids.clamp_min(0), p.double()
    )


def ref_ce_sequence(gold, nbytes):
    """Per-byte CE per (s, b) by explicit loops."""
    S, B, T = gold.shape
    out = torch.empty(S, B)
    for s in range(S):
        for b in range(B):
            nll = sum(-float(gold[s, b, t]) for t in range(T) if nbytes[s, b, t] > 0)
            nb = sum(int(nbytes[s, b, t]) for t in range(T))
            out[s, b] = nll / nb if nb else math.inf
    return out


@SETTINGS
@given(seed=st.integers(0, 10_000), S=st.integers(1, 4), pad=st.booleans())
def test_min_ce_sequence_picks_lowest_per_byte_ce(seed, S, pad):
    V = 30
    ids, lp, valid, gold, nbytes = make_sources(seed, S, 2, 6, 5, V, pad)
    res = min_ce(ids, lp, valid, gold, nbytes, level="sequence")
    ref = ref_ce_sequence(gold, nbytes)
    torch.testing.assert_close(res.ce, ref)
    best = ref.argmin(0)  # (B,)
    assert (res.selected == best[:, None]).all()
    for b in range(2):
        src = best[b]
        torch.testing.assert_close(
            densify(res.ids[b], res.logprobs[b], V), densify(ids[src, b], lp[src, b], V)
        )
    w = res.weights
    assert torch.equal(w.sum(0), torch.ones(2, 6))
    assert set(w.unique().tolist()) <= {0.0, 1.0}


@SETTINGS
@given(seed=st.integers(0, 10_000), S=st.integers(2, 4))
def test_min_ce_token_picks_lowest_per_byte_ce_per_position(seed, S):
    V = 30
    ids, lp, valid, gold, nbytes = make_sources(seed, S, 2, 6, 4, V)
    res = min_ce(ids, lp, valid, gold, nbytes, level="token")
    ce = -gold / nbytes  # (S, B, T)
    assert torch.equal(res.selected, ce.argmin(0))
    for b in range(2):
        for t in range(6):
            s = int(ce[:, b, t].argmin())
            torch.testing.assert_close(
                densify(res.ids[b, t], res.logprobs[b, t], V), densify(ids[s, b, t], lp[s, b, t], V)
            )


def test_per_byte_not_per_token_finer_tokenizer_does_not_win():
    """A finer tokenizer has a lower per-token CE but a higher per-byte CE: it must lose.

    12 bytes of text. Source 0 (fine) predicts 12 one-byte tokens at 0.6 nats each
    (per token 0.6, per byte 0.6). Source 1 (coarse) predicts 4 three-byte tokens at 1.2
    nats each (per token 1.2, per byte 0.4); it has predictions only where its tokens end.
    """
    T, K = 12, 3
    ids = torch.stack([torch.arange(K).expand(T, K), (torch.arange(K) + 5).expand(T, K)])
    lp = torch.full((2, T, K), math.log(0.3))
    coarse_end = torch.arange(T) % 3 == 2
    valid = torch.stack([torch.ones(T, dtype=torch.bool), coarse_end])
    gold = torch.stack([torch.full((T,), -0.6), torch.where(coarse_end, -1.2, 0.0)])
    nbytes = torch.stack([torch.ones(T, dtype=torch.long), torch.where(coarse_end, 3, 0)])

    # The naive per-token comparison would choose the fine source ...
    per_token = torch.stack([(-gold[s])[nbytes[s] > 0].mean() for s in range(2)])
    assert int(per_token.argmin()) == 0
    # ... the per-byte comparison prefers the coarse one.
    res = min_ce(ids, lp, valid, gold, nbytes, level="sequence")
    torch.testing.assert_close(res.ce, torch.tensor([0.6, 0.4]))
    assert (res.selected[coarse_end] == 1).all()
    assert (res.selected[~coarse_end] == 0).all()  # coarse has no prediction there
    assert res.win_counts().tolist() == [8, 4]
    tok = min_ce(ids, lp, valid, gold, nbytes, level="token")
    assert (tok.selected[coarse_end] == 1).all()
    avg = avg_ce(ids, lp, valid, gold, nbytes)
    assert (avg.weights[1, coarse_end] > 0.8).all()


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    S=st.integers(1, 4),
    level=st.sampled_from(["sequence", "token"]),
    weighting=st.sampled_from(["softmax", "inverse"]),
)
def test_avg_ce_weights_sum_to_one_and_mixture_is_exact(seed, S, level, weighting):
    V, K = 12, 4  # small V: the sources' top-k overlap a lot
    ids, lp, valid, gold, nbytes = make_sources(seed, S, 2, 5, K, V, pad=True)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.rand(S, 2, 5, generator=g) < 0.7
    res = avg_ce(ids, lp, valid, gold, nbytes, level=level, weighting=weighting)
    any_valid = valid.any(0)
    assert torch.equal(res.valid, any_valid)
    torch.testing.assert_close(res.weights.sum(0), any_valid.float())
    assert (res.weights[~valid] == 0).all()  # invalid sources excluded, rest renormalised
    # Sparse mixture == dense weighted sum of the sources.
    dense_src = densify(ids, lp, V)  # (S, B, T, V)
    expected = (res.weights.double().unsqueeze(-1) * dense_src).sum(0)
    torch.testing.assert_close(densify(res.ids, res.logprobs, V), expected)
    # Union bound, unique ids, padding where invalid, sorted by decreasing probability.
    assert res.ids.shape[-1] <= S * K
    for row_ids, row_lp in zip(res.ids.flatten(0, 1), res.logprobs.flatten(0, 1), strict=True):
        real = row_ids[row_ids >= 0]
        assert len(real) == len(set(real.tolist()))
        assert torch.isinf(row_lp[row_ids < 0]).all()
        assert (row_lp[:-1] >= row_lp[1:]).all()
    assert (res.ids[~any_valid] == -1).all()
    assert (res.selected[~any_valid] == -1).all()


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    S=st.integers(1, 4),
    rule=st.sampled_from(["min_ce", "avg_ce"]),
    max_k=st.sampled_from([None, 1, 3]),
)
def test_fused_tail_keeps_every_bit_of_mass(seed, S, rule, max_k):
    V, K = 12, 4
    ids, lp, valid, gold, nbytes = make_sources(seed, S, 2, 5, K, V, pad=True)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.rand(S, 2, 5, generator=g) < 0.7
    tail = torch.log1p(-lp.exp().sum(-1).clamp_max(1 - 1e-7))  # each source's true tail
    fn = min_ce if rule == "min_ce" else avg_ce
    res = fn(ids, lp, valid, gold, nbytes, max_k=max_k, tail_logmass=tail)
    total = torch.where(res.ids >= 0, res.logprobs.exp(), 0.0).sum(-1) + res.tail_logmass.exp()
    torch.testing.assert_close(total[res.valid], torch.ones_like(total[res.valid]))
    assert torch.isneginf(res.tail_logmass[~res.valid]).all()
    # Without a cap, the fused tail is the weights' mixture of the sources' tails.
    full = fn(ids, lp, valid, gold, nbytes, tail_logmass=tail)
    expected = (full.weights * tail.exp()).sum(0)
    torch.testing.assert_close(full.tail_logmass.exp()[full.valid], expected[full.valid])


def test_blend_with_gold():
    ids = torch.tensor([[3, 4], [5, -1]])
    lp = torch.log(torch.tensor([[0.5, 0.3], [0.9, 0.0]]))
    tail = torch.log(torch.tensor([0.2, 0.1]))
    nxt = torch.tensor([4, 7])
    same = blend_with_gold(ids, lp, tail, torch.ones(2), nxt)
    assert torch.equal(same[0], ids) and torch.equal(same[1], lp) and torch.equal(same[2], tail)
    b_ids, b_lp, b_tail = blend_with_gold(ids, lp, tail, torch.tensor([0.5, 0.0]), nxt)
    p0 = dict(zip(b_ids[0].tolist(), b_lp[0].exp().tolist(), strict=True))
    assert p0[4] == pytest.approx(0.65) and p0[3] == pytest.approx(0.25)
    assert b_tail[0].exp() == pytest.approx(0.1)
    assert b_ids[1].tolist()[0] == 7 and float(b_lp[1, 0]) == 0.0 and torch.isneginf(b_tail[1])


def _two_sources_with_ce(ce0: float, ce1: float):
    T, K = 4, 2
    ids = torch.stack([torch.tensor([[0, 1]] * T), torch.tensor([[2, 3]] * T)])
    lp = torch.full((2, T, K), math.log(0.5))
    valid = torch.ones(2, T, dtype=torch.bool)
    nbytes = torch.full((2, T), 2)
    gold = torch.stack([torch.full((T,), -2 * ce0), torch.full((T,), -2 * ce1)])
    return ids, lp, valid, gold, nbytes


def test_avg_ce_strongly_favours_lower_ce():
    ids, lp, valid, gold, nbytes = _two_sources_with_ce(0.5, 1.0)
    w = avg_ce(ids, lp, valid, gold, nbytes).weights[:, 0]
    assert w[0] > 0.99  # exp(-5) relative weight for the worse source at tau = 0.1
    # The research code's softmax(exp(-CE)) would be nearly uniform for the same CEs.
    buggy = torch.softmax(torch.exp(-torch.tensor([0.5, 1.0])), 0)
    assert buggy[0] < 0.6
    torch.testing.assert_close(w, torch.softmax(torch.tensor([-5.0, -10.0]), 0))
    w_inv = avg_ce(ids, lp, valid, gold, nbytes, weighting="inverse").weights[:, 0]
    torch.testing.assert_close(w_inv, torch.tensor([2 / 3, 1 / 3]))
    # tau -> small gives MinCE; large tau tends to uniform.
    w_big = avg_ce(ids, lp, valid, gold, nbytes, tau=100.0).weights[:, 0]
    assert abs(float(w_big[0]) - 0.5) < 0.01


def test_avg_ce_all_infinite_ce_mixes_uniformly():
    ids, lp, valid, gold, nbytes = _two_sources_with_ce(0.5, 1.0)
    gold = torch.full_like(gold, float("-inf"))  # both gave the gold text probability 0
    res = avg_ce(ids, lp, valid, gold, nbytes)
    torch.testing.assert_close(res.weights, torch.full((2, 4), 0.5))
    # One infinite, one finite: the finite one takes everything.
    gold[1] = -1.0
    res = avg_ce(ids, lp, valid, gold, nbytes)
    assert torch.equal(res.weights[1], torch.ones(4))


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    name=st.sampled_from(sorted(FUSION_FUNCTIONS)),
    level=st.sampled_from(["sequence", "token"]),
)
def test_one_source_is_identity(seed, name, level):
    ids, lp, valid, gold, nbytes = make_sources(seed, 1, 2, 5, 6, 40, pad=True)
    # capture stores the top-k in decreasing order; padding sorts last.
    lp, order = lp.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    valid[0, 0, 1] = False
    res = get_fusion(name)(ids, lp, valid, gold, nbytes, level=level)
    width = res.ids.shape[-1]
    ok = valid[0].unsqueeze(-1)
    # Only columns that are padding at every valid position are trimmed.
    assert (torch.where(ok, ids[0], -1)[..., width:] == -1).all()
    assert torch.equal(res.ids, torch.where(ok, ids[0, ..., :width], -1))
    assert torch.equal(res.logprobs, torch.where(ok, lp[0, ..., :width], float("-inf")))
    assert torch.equal(res.valid, valid[0])


def test_min_ce_falls_back_to_next_best_valid_source():
    ids, lp, valid, gold, nbytes = make_sources(0, 3, 1, 4, 3, 20)
    gold[:, 0] = torch.tensor([-1.0, -3.0, -2.0]).unsqueeze(-1)  # per byte order: 0 < 2 < 1
    nbytes[:] = 1
    valid[0, 0, 2] = False
    valid[:, 0, 3] = False
    res = min_ce(ids, lp, valid, gold, nbytes)
    assert res.selected[0].tolist() == [0, 0, 2, -1]
    assert res.valid[0].tolist() == [True, True, True, False]
    assert (res.ids[0, 3] == -1).all() and torch.isinf(res.logprobs[0, 3]).all()


@pytest.mark.parametrize("field", ["logprobs", "gold_logprob"])
def test_nan_raises_naming_source_and_position(field):
    ids, lp, valid, gold, nbytes = make_sources(0, 3, 2, 5, 4, 20)
    if field == "logprobs":
        lp[2, 1, 3, 0] = float("nan")
    else:
        gold[2, 1, 3] = float("nan")
    for fn in (min_ce, avg_ce):
        with pytest.raises(ValueError, match=rf"NaN in {field} of mpt at block 1, position 3"):
            fn(ids, lp, valid, gold, nbytes, source_names=["llama", "openllama", "mpt"])


def test_registry_and_unknown_name():
    assert set(FUSION_FUNCTIONS) == {"min_ce", "avg_ce"}
    for name, (fn, description) in FUSION_FUNCTIONS.items():
        assert get_fusion(name) is fn
        assert "2401.10491" in description
    with pytest.raises(ValueError, match="valid names: avg_ce, min_ce"):
        get_fusion("max_ce")


def test_unbatched_input_and_per_byte_ce_shapes():
    ids, lp, valid, gold, nbytes = make_sources(3, 2, 1, 7, 4, 25)
    batched = avg_ce(ids, lp, valid, gold, nbytes, level="token")
    single = avg_ce(ids[:, 0], lp[:, 0], valid[:, 0], gold[:, 0], nbytes[:, 0], level="token")
    assert single.ids.shape == batched.ids.shape[1:]
    assert torch.equal(single.ids, batched.ids[0])
    assert torch.equal(single.weights, batched.weights[:, 0])
    assert single.ce.shape == (2, 7)
    assert per_byte_ce(gold, nbytes, "sequence").shape == (2, 1)
    nbytes[1] = 0  # covers nothing: cannot be compared
    assert torch.isinf(per_byte_ce(gold, nbytes)[1]).all()


def test_stack_sources_pads_k_and_max_k_keeps_the_largest():
    a_ids, b_ids = torch.tensor([[[1, 2]]]), torch.tensor([[[2, 3, 4]]])
    a_lp = torch.log(torch.tensor([[[0.6, 0.2]]]))
    b_lp = torch.log(torch.tensor([[[0.5, 0.3, 0.1]]]))
    ids = stack_sources([a_ids, b_ids], -1)
    lp = stack_sources([a_lp, b_lp], float("-inf"))
    assert ids.shape == (2, 1, 1, 3) and ids[0, 0, 0, 2] == -1
    valid = torch.ones(2, 1, 1, dtype=torch.bool)
    nb = torch.ones(2, 1, 1, dtype=torch.long)
    gold = torch.full((2, 1, 1), -1.0)  # equal CE -> equal weights
    res = avg_ce(ids, lp, valid, gold, nb)
    assert res.ids[0, 0].tolist() == [2, 1, 3, 4]  # 0.35, 0.30, 0.15, 0.05
    torch.testing.assert_close(res.logprobs.exp()[0, 0], torch.tensor([0.35, 0.3, 0.15, 0.05]))
    top2 = avg_ce(ids, lp, valid, gold, nb, max_k=2)
    assert top2.ids[0, 0].tolist() == [2, 1]


def test_fill_fallback_uses_next_token():
    ids = torch.tensor([[[3, 4], [-1, -1], [-1, -1]]])
    lp = torch.tensor([[[-0.1, -2.0], [float("-inf")] * 2, [float("-inf")] * 2]])
    valid = torch.tensor([[True, False, False]])
    next_ids = torch.tensor([[7, 8, -1]])  # last position has no next token
    f_ids, f_lp, f_valid, _ = fill_fallback(ids, lp, valid, next_ids)
    assert f_ids.tolist() == [[[3, 4], [8, -1], [-1, -1]]]
    assert f_lp[0, 1].tolist() == [0.0, float("-inf")]
    assert f_valid.tolist() == [[True, True, False]]
