"""Property and equivalence tests of the sparse training losses (fuselm.train.losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fuselm.train.losses import (
    clm_loss,
    combined_loss,
    fusion_loss,
    shifted_target_mask,
)

SETTINGS = settings(max_examples=20, deadline=None, database=None)


def make_batch(seed: int, B: int = 2, T: int = 6, V: int = 11, n_ignored: int = 2):
    """Random logits, labels with some -100, and a full-vocabulary teacher."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        labels[b, torch.randperm(T, generator=g)[:n_ignored]] = -100
    teacher_full = (torch.randn(B, T, V, generator=g) * 2).log_softmax(-1)  # (B, T, V)
    return logits, labels, teacher_full


def sparse_from_full(teacher_full: torch.Tensor, k: int, seed: int = 0, sort: bool = False):
    """Take k teacher entries per row (random order, or the top-k when sort)."""
    g = torch.Generator().manual_seed(seed)
    if sort:
        ids = teacher_full.argsort(-1, descending=True)[..., :k]
    else:
        ids = torch.rand(teacher_full.shape, generator=g).argsort(-1)[..., :k]
    return ids, teacher_full.gather(-1, ids)


def dense_reference(logits, teacher_full, labels, kind, temperature):
    """Textbook dense computation: full (B, T, V) teacher and student log-softmax."""
    logp = (logits / temperature).log_softmax(-1)
    log_q = (teacher_full / temperature).log_softmax(-1)
    q = log_q.exp()
    per_pos = -(q * logp).sum(-1) if kind == "ce" else (q * (log_q - logp)).sum(-1)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return per_pos[mask].mean()


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["ce", "kl"]),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 3.7]),
)
def test_sparse_equals_dense_when_k_is_vocab(seed, kind, temperature):
    logits, labels, teacher_full = make_batch(seed)
    V = logits.shape[-1]
    ids, lp = sparse_from_full(teacher_full, V, seed)  # all V entries, shuffled order
    loss, parts = fusion_loss(logits, ids, lp, labels, kind=kind, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = dense_reference(logits, teacher_full, labels, kind, temperature)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert int(parts["fusion_tokens"]) == int(shifted_target_mask(labels).sum())


@SETTINGS
@given(seed=st.integers(0, 10_000), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_kl_is_zero_when_student_equals_teacher(seed, temperature):
    logits, labels, _ = make_batch(seed)
    teacher_full = logits.detach().log_softmax(-1)  # the student's own distribution
    ids, lp = sparse_from_full(teacher_full, logits.shape[-1], seed)
    loss, _ = fusion_loss(logits, ids, lp, labels, kind="kl", temperature=temperature)
    assert abs(loss.item()) < 1e-5
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() < 1e-5  # a minimum, not just a zero value


def test_kl_with_tail_bucket_is_zero_for_matching_top_k():
    # K < V: the teacher's top-k and its tail mass equal the student's exactly.
    logits, labels, _ = make_batch(3, V=20)
    ids, lp = sparse_from_full(logits.detach().log_softmax(-1), 5, sort=True)
    loss, _ = fusion_loss(logits, ids, lp, labels, kind="kl", tail_bucket=True)
    assert abs(loss.item()) < 1e-5
    # Without the bucket the renormalised top-k is *not* the student: KL > 0.
    loss_renorm, _ = fusion_loss(logits, ids, lp, labels, kind="kl")
    assert loss_renorm.item() > 1e-3


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("given_tail", [False, True])
def test_tail_bucket_equals_dense_on_coarse_partition(kind, given_tail):
    logits, labels, teacher_full = make_batch(5, V=20)
    ids, lp = sparse_from_full(teacher_full, 6, seed=1)
    tail = torch.log1p(-lp.exp().sum(-1))  # (B, T) the teacher's true tail mass
    loss, _ = fusion_loss(
        logits, ids, lp, labels, kind=kind, tail_bucket=True,
        teacher_tail_logmass=tail if given_tail else None,
    )  # fmt: skip
    # Dense reference over K + 1 categories: the k ids, and everything else lumped.
    logp_full = logits.log_softmax(-1)
    logp_k = logp_full.gather(-1, ids)  # (B, T, K)
    logp_rest = torch.log1p(-logp_k.exp().sum(-1))
    logp_cat = torch.cat([logp_k, logp_rest.unsqueeze(-1)], -1)
    log_q_cat = torch.cat([lp, tail.unsqueeze(-1)], -1)
    q = log_q_cat.exp()
    per_pos = -(q * logp_cat).sum(-1) if kind == "ce" else (q * (log_q_cat - logp_cat)).sum(-1)
    ref = per_pos[shifted_target_mask(labels)].mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    g1, g2 = torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def coarse_reference(logits, ids, lp, tail, labels, kind, temperature):
    """Dense textbook version of the tempered tail bucket: K + 1 categories, both sides."""
    logp_full = logits.log_softmax(-1)
    logp_k = logp_full.gather(-1, ids)  # (B, T, K)
    logp_rest = torch.log1p(-logp_k.exp().sum(-1).clamp_max(1 - 1e-12))
    logp_t = (torch.cat([logp_k, logp_rest.unsqueeze(-1)], -1) / temperature).log_softmax(-1)
    log_q_t = (torch.cat([lp, tail.unsqueeze(-1)], -1) / temperature).log_softmax(-1)
    q = log_q_t.exp()
    per_pos = -(q * logp_t).sum(-1) if kind == "ce" else (q * (log_q_t - logp_t)).sum(-1)
    return per_pos[shifted_target_mask(labels)].mean()


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["ce", "kl"]),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 3.7]),
)
def test_tempered_tail_bucket_equals_dense_on_coarse_partition(seed, kind, temperature):
    logits, labels, teacher_full = make_batch(seed, V=17)
    ids, lp = sparse_from_full(teacher_full, 5, seed=seed)
    tail = torch.log1p(-lp.exp().sum(-1))
    loss, _ = fusion_loss(
        logits, ids, lp, labels, kind=kind, tail_bucket=True, temperature=temperature,
        teacher_tail_logmass=tail,
    )  # fmt: skip
    ref = coarse_reference(logits, ids, lp, tail, labels, kind, temperature)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    g1, g2 = torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10_000), temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_tail_bucket_kl_is_zero_at_every_temperature_when_student_is_teacher(seed, temperature):
    logits, labels, _ = make_batch(seed, V=20)
    ids, lp = sparse_from_full(logits.detach().log_softmax(-1), 5, sort=True)
    tail = torch.log1p(-lp.exp().sum(-1))
    kw = dict(kind="kl", tail_bucket=True, temperature=temperature, teacher_tail_logmass=tail)
    loss, _ = fusion_loss(logits, ids, lp, labels, **kw)
    assert abs(loss.item()) < 1e-5
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() < 1e-5  # a minimum, not just a zero value


def test_temperature_squared_scales_the_fusion_term():
    logits, labels, teacher_full = make_batch(21, V=15)
    ids, lp = sparse_from_full(teacher_full, 4)
    for tail in (False, True):
        kw = dict(tail_bucket=tail, temperature=2.5, kind="kl")
        plain, _ = fusion_loss(logits, ids, lp, labels, **kw)
        scaled, _ = fusion_loss(logits, ids, lp, labels, temperature_squared=True, **kw)
        torch.testing.assert_close(scaled, 6.25 * plain)
        assert plain.item() > 0


def test_gold_diagnostics():
    # One position with a target per row; V = 6. Gold token of (0, 0) is 2, of (1, 0) is 5.
    logits = torch.zeros(2, 2, 6, requires_grad=True)
    labels = torch.tensor([[0, 2], [0, 5]])
    ids = torch.tensor([[[2, 3], [-1, -1]], [[1, 3], [-1, -1]]])
    lp = torch.log(torch.tensor([[[0.5, 0.25], [1.0, 1.0]], [[0.6, 0.2], [1.0, 1.0]]]))
    tail = torch.log(torch.tensor([[0.25, 1.0], [0.2, 1.0]]))
    for bucket in (False, True):
        _, parts = combined_loss(
            logits, labels, ids, lp, lam=0.5, tail_bucket=bucket, teacher_tail_logmass=tail
        )
        assert float(parts["gold_inside"]) == 1 and float(parts["gold_outside"]) == 1
        q_gold = 0.5 if bucket else 0.5 / 0.75  # renormalised: inflated by 1 / top-k mass
        assert float(parts["teacher_gold_nll"]) == pytest.approx(-math.log(q_gold), rel=1e-5)
        assert float(parts["student_gold_nll"]) == pytest.approx(math.log(6), rel=1e-5)
        assert float(parts["tail_mass"]) == pytest.approx(0.45, rel=1e-5)


def test_tail_bucket_full_vocab_equals_plain():
    logits, labels, teacher_full = make_batch(2)
    ids, lp = sparse_from_full(teacher_full, logits.shape[-1])
    plain, _ = fusion_loss(logits, ids, lp, labels)
    with_tail, _ = fusion_loss(logits, ids, lp, labels, tail_bucket=True)
    torch.testing.assert_close(plain, with_tail, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["ce", "kl"]),
    tail=st.booleans(),
    temperature=st.sampled_from([1.0, 2.0]),
)
def test_masked_positions_do_not_matter(seed, kind, tail, temperature):
    logits, labels, teacher_full = make_batch(seed, n_ignored=3)
    ids, lp = sparse_from_full(teacher_full, 4, seed)
    kw = dict(kind=kind, temperature=temperature, tail_bucket=tail, lam=0.5)
    loss, parts = combined_loss(logits, labels, ids, lp, **kw)
    (grad,) = torch.autograd.grad(loss, logits)
    masked = ~shifted_target_mask(labels)  # includes the last position
    assert masked[:, -1].all()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(logits.shape, generator=g) * 1e4
    changed = torch.where(masked.unsqueeze(-1), noise, logits.detach()).requires_grad_()
    lp_garbage = torch.where(masked.unsqueeze(-1), torch.full_like(lp, float("nan")), lp)
    loss2, parts2 = combined_loss(changed, labels, ids, lp_garbage, **kw)
    (grad2,) = torch.autograd.grad(loss2, changed)
    torch.testing.assert_close(loss2, loss)
    for key in ("clm", "fusion", "total"):
        torch.testing.assert_close(parts2[key], parts[key])
    assert (grad2[masked] == 0).all() and (grad[masked] == 0).all()
    torch.testing.assert_close(grad2[~masked], grad[~masked])


@pytest.mark.parametrize("tail", [False, True])
def test_padding_ids_are_ignored(tail):
    logits, labels, teacher_full = make_batch(4, V=15)
    ids, lp = sparse_from_full(teacher_full, 5)
    loss, parts = fusion_loss(logits, ids, lp, labels, tail_bucket=tail)
    # Mix in padding columns carrying garbage log-probabilities (even NaN), anywhere.
    pad_ids = torch.full_like(ids, -1)
    garbage = torch.full_like(lp, float("nan"))
    order = torch.randperm(2 * ids.shape[-1], generator=torch.Generator().manual_seed(0))
    ids_p = torch.cat([pad_ids, ids], -1)[..., order]  # (B, T, 2K)
    lp_p = torch.cat([garbage, lp], -1)[..., order]
    loss_p, parts_p = fusion_loss(logits, ids_p, lp_p, labels, tail_bucket=tail)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(
        torch.autograd.grad(loss_p, logits)[0], torch.autograd.grad(loss, logits)[0]
    )
    # A row of only padding has no teacher: excluded from the average.
    keep = shifted_target_mask(labels)
    b, t = keep.nonzero()[0].tolist()
    ids_p[b, t] = -1
    loss_r, parts_r = fusion_loss(logits, ids_p, lp_p, labels, tail_bucket=tail)
    assert int(parts_r["fusion_tokens"]) == int(parts["fusion_tokens"]) - 1
    assert torch.isfinite(loss_r)


def test_gradient_flows_to_student_only():
    logits, labels, teacher_full = make_batch(6)
    ids, lp = sparse_from_full(teacher_full, 4)
    lp = lp.clone().requires_grad_()
    tail = torch.full(labels.shape, -3.0, requires_grad=True)
    for kw in (dict(kind="kl"), dict(tail_bucket=True, teacher_tail_logmass=tail)):
        loss, _ = combined_loss(logits, labels, ids, lp, **kw)
        loss.backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        assert lp.grad is None and tail.grad is None
        logits.grad = None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_plain(temperature):
    logits, labels, teacher_full = make_batch(7, T=11)
    ids, lp = sparse_from_full(teacher_full, 4)
    kw = dict(temperature=temperature, kind="kl", lam=0.3)
    plain, _ = combined_loss(logits, labels, ids, lp, **kw)
    chunked, _ = combined_loss(logits, labels, ids, lp, chunk_size=4, **kw)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(
        torch.autograd.grad(chunked, logits)[0], torch.autograd.grad(plain, logits)[0]
    )


def test_clm_matches_torch_cross_entropy():
    logits, labels, _ = make_batch(8, n_ignored=3)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(clm_loss(logits, labels), ref)
    torch.testing.assert_close(clm_loss(logits, labels, chunk_size=2), ref)


def test_combined_is_named_weighted_sum():
    logits, labels, teacher_full = make_batch(9)
    ids, lp = sparse_from_full(teacher_full, 4)
    loss, parts = combined_loss(logits, labels, ids, lp, lam=0.9, temperature=2.0)
    clm = clm_loss(logits, labels)
    fus, _ = fusion_loss(logits, ids, lp, labels, temperature=2.0)
    torch.testing.assert_close(loss, 0.9 * clm + 0.1 * fus)
    torch.testing.assert_close(parts["clm"], clm.detach())
    torch.testing.assert_close(parts["fusion"], fus.detach())
    torch.testing.assert_close(parts["total"], loss.detach())
    assert not parts["total"].requires_grad
    # lam = 1: the CLM-only control needs no teacher.
    loss1, parts1 = combined_loss(logits, labels, lam=1.0)
    torch.testing.assert_close(loss1, clm)
    assert float(parts1["fusion"]) == 0 and int(parts1["fusion_tokens"]) == 0
    loss0, _ = combined_loss(logits, labels, ids, lp, lam=0.0, temperature=2.0)
    torch.testing.assert_close(loss0, fus)


def test_no_valid_position_gives_zero_loss_and_finite_grad():
    logits, _, teacher_full = make_batch(10)
    labels = torch.full(logits.shape[:2], -100)
    ids, lp = sparse_from_full(teacher_full, 3)
    loss, parts = combined_loss(logits, labels, ids, lp, tail_bucket=True)
    assert loss.item() == 0 and int(parts["clm_tokens"]) == 0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and (grad == 0).all()


def test_bfloat16_logits_close_to_float32():
    logits, labels, teacher_full = make_batch(11, V=64)
    ids, lp = sparse_from_full(teacher_full, 8)
    ref, _ = combined_loss(logits, labels, ids, lp)
    low, _ = combined_loss(logits.detach().bfloat16(), labels, ids, lp)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="ce", temperature=2.0, lam=0.3),
        dict(kind="kl", temperature=0.5, lam=0.0),
        dict(kind="kl", tail_bucket=True, lam=0.5),
        dict(kind="ce", tail_bucket=True, lam=0.0),
        dict(kind="kl", tail_bucket=True, lam=0.4, temperature=2.0, temperature_squared=True),
        dict(kind="ce", tail_bucket=True, lam=0.0, temperature=0.7),
        dict(lam=1.0),
    ],
)
def test_gradcheck_float64(kw):
    """The hand-written backward against finite differences (several chunks, padding)."""
    logits, labels, teacher_full = make_batch(13, B=2, T=5, V=7)
    logits = logits.detach().double().requires_grad_()
    ids, lp = sparse_from_full(teacher_full, 3)
    ids[0, 1, 0] = -1
    ids[1, 2] = -1  # a row without teacher

    def f(x):
        return combined_loss(x, labels, ids, lp, chunk_size=2, **kw)[0]

    assert torch.autograd.gradcheck(f, (logits,))


def test_tiny_student_tail_gradient_is_accurate():
    """The student puts almost all mass on the teacher's ids: no cancellation blow-up."""
    logits, labels, teacher_full = make_batch(14, V=12)
    ids, lp = sparse_from_full(teacher_full, 4, sort=True)
    boosted = logits.detach().clone()
    boosted.scatter_add_(-1, ids, torch.full(ids.shape, 12.0))  # tail mass ~ 1e-5
    x32 = boosted.clone().requires_grad_()
    x64 = boosted.double().requires_grad_()
    kw = dict(tail_bucket=True, lam=0.0)
    g32 = torch.autograd.grad(combined_loss(x32, labels, ids, lp, **kw)[0], x32)[0]
    g64 = torch.autograd.grad(combined_loss(x64, labels, ids, lp, **kw)[0], x64)[0]
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-5)


def test_bad_inputs_raise():
    logits, labels, teacher_full = make_batch(12, V=10)
    ids, lp = sparse_from_full(teacher_full, 3)
    bad = ids.clone()
    bad[1, 2, 0] = 10
    with pytest.raises(ValueError, match=r"outside \[-1, 10\) at batch row 1, position 2"):
        fusion_loss(logits, bad, lp, labels)
    dup = ids.clone()
    dup[0, 1, 1] = dup[0, 1, 0]
    with pytest.raises(ValueError, match="duplicate teacher id .* row 0, position 1"):
        fusion_loss(logits, dup, lp, labels)
    nan = lp.clone()
    b, t = shifted_target_mask(labels).nonzero()[-1].tolist()
    nan[b, t, 2] = float("nan")
    with pytest.raises(ValueError, match=f"NaN teacher log-probability at batch row {b}, po"):
        fusion_loss(logits, ids, nan, labels)
    labels[b, t + 1] = -100  # the same NaN at a position without a target is never read
    assert torch.isfinite(fusion_loss(logits, ids, nan, labels)[0])
    with pytest.raises(ValueError, match="kind must be"):
        fusion_loss(logits, ids, lp, labels, kind="js")
    with pytest.raises(ValueError, match="lam must be in"):
        combined_loss(logits, labels, ids, lp, lam=1.5)
    with pytest.raises(ValueError, match="needs teacher_ids"):
        combined_loss(logits, labels, lam=0.9)
    bad_labels = labels.clone()
    bad_labels[0, 0] = 10
    with pytest.raises(ValueError, match=r"label 10 outside \[0, 10\)"):
        clm_loss(logits, bad_labels)
    with pytest.raises(ValueError, match="teacher_ids must be"):
        fusion_loss(logits, ids[:, :-1], lp[:, :-1], labels)
