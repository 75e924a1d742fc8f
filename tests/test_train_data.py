"""Training data: join by hash, fusion per block, fallback, rows, batching order, collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuselm.align.records import AlignedBlock
from fuselm.fuse import min_ce
from fuselm.train.batching import collate, count_steps, plan_steps, rank_slice
from fuselm.train.data import (
    FusionSpec,
    TrainDataError,
    TrainExample,
    build_examples,
    fuse_block,
    join_sources,
    split_rows,
)
from fuselm.train.losses import IGNORE_INDEX, combined_loss


def block(
    h: str,
    input_ids,
    ids,
    logprobs,
    valid=None,
    gold=None,
    next_bytes=None,
    nll=(1.0, 1),
    split: str = "train",
    one_to_one=None,
    domain: str = "d",
) -> AlignedBlock:
    input_ids = np.asarray(input_ids, np.int32)
    ids = np.asarray(ids, np.int32)
    p = len(input_ids) - 1
    valid = np.ones(p, bool) if valid is None else np.asarray(valid, bool)
    mass = np.exp(np.asarray(logprobs, np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        tail = np.where(valid, np.log(np.clip(1.0 - mass, 0.0, 1.0)), -np.inf)
    return AlignedBlock(
        hash=h,
        block_id=f"doc#{h}",
        domain=domain,
        split=split,
        input_ids=input_ids,
        ids=ids,
        logprobs=np.asarray(logprobs, np.float32),
        valid=valid,
        gold=np.full(p, -1.0, np.float32) if gold is None else np.asarray(gold, np.float32),
        next_bytes=np.ones(p, np.int32) if next_bytes is None else np.asarray(next_bytes, np.int32),
        nll_sum=nll[0],
        nll_bytes=nll[1],
        tail_logmass=tail.astype(np.float32),
        one_to_one=valid.copy() if one_to_one is None else np.asarray(one_to_one, bool),
    )


def two_sources():
    """Source a covers every position; source b misses position 1."""
    inp = [5, 6, 7, 8]
    a = block("h1", inp, [[6, 1], [7, 2], [8, 3]], np.log([[0.7, 0.2]] * 3), nll=(3.0, 3))
    b = block(
        "h1",
        inp,
        [[6, -1], [-1, -1], [8, -1]],
        [[np.log(0.9), -np.inf], [-np.inf, -np.inf], [np.log(0.9), -np.inf]],
        valid=[True, False, True],
        nll=(1.0, 3),
    )
    return {"a": {"h1": a}, "b": {"h1": b}}


def test_join_is_by_hash_and_sorted():
    inp = [1, 2, 3]
    lp = np.log([[0.5], [0.5]])
    s = {
        "a": {"z": block("z", inp, [[2], [3]], lp), "y": block("y", inp, [[2], [3]], lp)},
        "b": {"y": block("y", inp, [[2], [3]], lp), "z": block("z", inp, [[2], [3]], lp)},
    }
    joined = join_sources(s)
    assert [h for h, _ in joined] == ["y", "z"]
    assert all(len(bs) == 2 for _, bs in joined)


def test_missing_block_names_source_and_block():
    s = two_sources()
    s["b"] = {}
    with pytest.raises(
        TrainDataError, match=r"teacher 'b' has no aligned block doc#h1 \(hash h1\)"
    ):
        join_sources(s)


def test_different_input_ids_is_an_error():
    s = two_sources()
    b = s["b"]["h1"]
    b.input_ids = np.array([5, 6, 7, 9], np.int32)
    with pytest.raises(TrainDataError, match="different target token ids"):
        join_sources(s)


def test_split_filter():
    inp = [1, 2, 3]
    lp = np.log([[0.5], [0.5]])
    s = {"a": {"v": block("v", inp, [[2], [3]], lp, split="validation")}}
    assert join_sources(s, split="train") == []
    assert len(join_sources(s, split=None)) == 1


def test_fallback_is_the_next_token_not_the_current():
    # One source without any prediction at position 1 (predicts token index 2 = 7).
    inp = [5, 6, 7, 8]
    a = block(
        "h",
        inp,
        [[6], [-1], [8]],
        [[0.0], [-np.inf], [0.0]],
        valid=[True, False, True],
    )
    fb = fuse_block([a], ["a"], FusionSpec(fallback="one_hot_next"))
    assert fb.no_teacher == 1
    assert fb.ids[1, 0] == 7 and fb.logprobs[1, 0] == 0.0  # next token, probability 1
    assert fb.ids[1, 0] != inp[1]
    assert (fb.ids[1, 1:] == -1).all()


def test_masked_positions_are_excluded_from_the_fusion_loss():
    inp = [5, 6, 7, 8]
    a = block("h", inp, [[6], [-1], [8]], [[0.0], [-np.inf], [0.0]], valid=[True, False, True])
    data = build_examples(join_sources({"a": {"h": a}}), ["a"], FusionSpec(fallback="mask"), 64)
    ex = data.examples[0]
    assert (ex.teacher_ids[1] == -1).all()
    batch = collate([ex])
    assert int(batch["fusion_tokens"]) == 2 and int(batch["clm_tokens"]) == 3
    # The loss counts exactly those positions, and the masked one gets no fusion gradient.
    logits = torch.randn(1, 4, 10, requires_grad=True)
    loss, parts = combined_loss(
        logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"], lam=0.0
    )
    assert int(parts["fusion_tokens"]) == 2
    loss.backward()
    assert torch.all(logits.grad[0, 1] == 0) and logits.grad[0, 0].abs().sum() > 0
    assert data.fusion.no_teacher == 1 and data.fusion.as_dict()["masked_share"] == pytest.approx(
        1 / 3, abs=1e-6
    )


def test_sequence_level_uses_whole_block_ce():
    # On the aligned positions source b looks better (gold -0.1 vs -1.0 per byte), but over
    # the whole block (nll_sum / nll_bytes) a is better: a must win.
    inp = [1, 2, 3, 4]
    a = block("h", inp, [[2], [3], [4]], [[-0.5]] * 3, gold=[-1.0] * 3, nll=(3.0, 6))
    b = block("h", inp, [[9], [9], [9]], [[-0.1]] * 3, gold=[-0.1] * 3, nll=(30.0, 6))
    fb = fuse_block([a, b], ["a", "b"], FusionSpec(function="min_ce", level="sequence"))
    assert fb.selected.tolist() == [3, 0]
    assert fb.ids[:, 0].tolist() == [2, 3, 4]
    # Token level decides from the aligned positions instead: b wins there.
    fb_tok = fuse_block([a, b], ["a", "b"], FusionSpec(function="min_ce", level="token"))
    assert fb_tok.selected.tolist() == [0, 3]


def test_fuse_sequence_ce_parameter():
    # fuselm.fuse's explicit per-block CE overrides the one from the aligned positions.
    ids = torch.tensor([[[1], [2]], [[3], [4]]])  # (S=2, T=2, K=1)
    lp = torch.zeros(2, 2, 1)
    valid = torch.ones(2, 2, dtype=torch.bool)
    gold = torch.tensor([[-5.0, -5.0], [-0.1, -0.1]])
    nb = torch.ones(2, 2, dtype=torch.long)
    assert min_ce(ids, lp, valid, gold, nb).selected.tolist() == [1, 1]
    res = min_ce(ids, lp, valid, gold, nb, sequence_ce=torch.tensor([0.5, 2.0]))
    assert res.selected.tolist() == [0, 0] and res.ce.tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="NaN in sequence_ce of source 1"):
        min_ce(ids, lp, valid, gold, nb, sequence_ce=torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="only meaningful"):
        min_ce(ids, lp, valid, gold, nb, level="token", sequence_ce=torch.tensor([0.5, 2.0]))


def test_avg_ce_and_max_k_cap():
    s = two_sources()
    names = list(s)
    joined = join_sources(s)
    fb = fuse_block(joined[0][1], names, FusionSpec(function="avg_ce"))
    assert fb.width >= 2
    capped = fuse_block(joined[0][1], names, FusionSpec(function="avg_ce", max_k=1))
    assert capped.ids.shape[1] == 1 and np.array_equal(capped.ids[:, 0], fb.ids[:, 0])


def mass(fb, t):
    """Total probability of fused row t: entries + tail."""
    return float(np.exp(fb.logprobs[t][fb.ids[t] >= 0]).sum() + np.exp(fb.tail_logmass[t]))


def test_fused_tail_follows_the_weights_and_the_cap():
    s = two_sources()
    names = list(s)
    ((_, blocks),) = join_sources(s)
    specs = (FusionSpec(), FusionSpec(function="avg_ce"), FusionSpec(function="avg_ce", max_k=1))
    for spec in specs:
        fb = fuse_block(blocks, names, spec)
        for t in range(3):
            assert mass(fb, t) == pytest.approx(1.0, abs=1e-5)  # nothing dropped silently
    # MinCE (sequence level): the chosen source's own tail, untouched.
    fb = fuse_block(blocks, names, FusionSpec())
    chosen = blocks[int(np.argmax(fb.selected))]
    at = chosen.valid  # elsewhere the other source stands in (with its own tail)
    np.testing.assert_allclose(fb.tail_logmass[at], chosen.tail_logmass[at], atol=1e-6)
    # The cap moves the cut entries into the tail.
    full = fuse_block(blocks, names, FusionSpec(function="avg_ce"))
    capped = fuse_block(blocks, names, FusionSpec(function="avg_ce", max_k=1))
    assert (capped.tail_logmass > full.tail_logmass + 1e-3).all()


def test_fallback_rows_have_no_tail():
    inp = [5, 6, 7, 8]
    a = block("h", inp, [[6], [-1], [8]], np.log([[0.5], [1.0], [0.5]]), valid=[True, False, True])
    fb = fuse_block([a], ["a"], FusionSpec(fallback="one_hot_next"))
    assert np.isneginf(fb.tail_logmass[1]) and fb.tail_logmass[0] == pytest.approx(np.log(0.5))
    assert fb.source.tolist() == [0, -1, 0]


def test_one_to_one_positions_only():
    inp = [5, 6, 7, 8]
    a = block("h", inp, [[6], [9], [8]], np.log([[0.9], [0.9], [0.9]]), one_to_one=[1, 0, 1])
    fb = fuse_block([a], ["a"], FusionSpec(positions="one_to_one"))
    assert fb.ids[:, 0].tolist() == [6, 7, 8]  # position 1 falls back to the gold one-hot
    assert fb.no_teacher == 1
    assert fuse_block([a], ["a"], FusionSpec()).ids[1, 0] == 9


def gate_sources():
    """Target t (source #0) is best on block 'x'; the teacher e is better on block 'y'."""
    inp = [5, 6, 7, 8]
    lp = np.log([[0.6, 0.3]] * 3)
    t_x = block("x", inp, [[6, 1], [7, 1], [8, 1]], lp, nll=(1.0, 4))
    e_x = block("x", inp, [[9, 6], [9, 7], [9, 8]], lp, nll=(2.0, 4))
    t_y = block("y", inp, [[6, 1], [7, 1], [8, 1]], lp, nll=(2.0, 4))
    e_y = block("y", inp, [[9, 6], [9, 7], [9, 8]], lp, nll=(1.8, 4))
    return {"t": {"x": t_x, "y": t_y}, "e": {"x": e_x, "y": e_y}}


def test_gate_teacher_better_gives_plain_clm_where_the_target_wins():
    s = gate_sources()
    (_, bx), (_, by) = join_sources(s)
    spec = FusionSpec(gate="teacher_better", target="t")
    fx, fy = fuse_block(bx, ["t", "e"], spec), fuse_block(by, ["t", "e"], spec)
    # Block x: MinCE picked the target itself -> gold one-hot, no tail, source GOLD.
    assert fx.ids[:, 0].tolist() == [6, 7, 8] and (fx.ids[:, 1:] == -1).all()
    assert np.isneginf(fx.tail_logmass).all() and fx.source.tolist() == [-2, -2, -2]
    # Block y: the teacher e is better: its distribution, unchanged.
    plain = fuse_block(by, ["t", "e"], FusionSpec())
    np.testing.assert_array_equal(fy.ids, plain.ids)
    np.testing.assert_allclose(fy.logprobs, plain.logprobs)
    assert fy.source.tolist() == [1, 1, 1]
    # At T = 1 the fusion term at a gated position equals the CLM term.
    data = build_examples([("x", bx)], ["t", "e"], spec, 64)
    b = collate(data.examples)
    logits = torch.randn(1, 4, 12)
    _, parts = combined_loss(
        logits, b["labels"], b["teacher_ids"], b["teacher_logprobs"], lam=0.5, tail_bucket=True,
        teacher_tail_logmass=b["teacher_tail_logmass"],
    )  # fmt: skip
    torch.testing.assert_close(parts["fusion"], parts["clm"])
    with pytest.raises(TrainDataError, match="needs the target as a source"):
        FusionSpec(gate="teacher_better")


def test_gate_advantage_scales_the_teacher_share():
    s = gate_sources()
    (_, by) = join_sources(s)[1]
    # Advantage on y: 2.0/4 - 1.8/4 = 0.05 nats/byte; scale 0.1 -> half teacher, half gold.
    fb = fuse_block(by, ["t", "e"], FusionSpec(gate="advantage", gate_scale=0.1, target="t"))
    plain = fuse_block(by, ["t", "e"], FusionSpec())
    for t, gold in enumerate([6, 7, 8]):
        p = dict(zip(fb.ids[t].tolist(), np.exp(fb.logprobs[t]).tolist(), strict=True))
        q = dict(zip(plain.ids[t].tolist(), np.exp(plain.logprobs[t]).tolist(), strict=True))
        assert p[9] == pytest.approx(0.5 * q[9], rel=1e-5)
        assert p[gold] == pytest.approx(0.5 * q[gold] + 0.5, rel=1e-5)
        assert mass(fb, t) == pytest.approx(1.0, abs=1e-5)
    # A teacher worse than the target gets no share at all.
    (_, bx) = join_sources(s)[0]
    fx = fuse_block(bx, ["t", "e"], FusionSpec(gate="advantage", target="t"))
    assert fx.source.tolist() == [-2, -2, -2]


def test_fusion_diagnostics_by_domain():
    s = gate_sources()
    data = build_examples(join_sources(s), ["t", "e"], FusionSpec(target="t"), 64)
    d = data.fusion.as_dict()["diagnostics_by_domain"]["d"]
    ln2 = np.log(2)
    # Block x: teacher = t (CE 0.25/byte); block y: teacher = e (0.45). Target: 0.25, 0.5.
    assert d["teacher_bits_per_byte"] == pytest.approx((0.25 + 0.45) / 2 / ln2, rel=1e-5)
    assert d["target_bits_per_byte"] == pytest.approx((0.25 + 0.5) / 2 / ln2, rel=1e-5)
    assert d["gold_outside_share"] == pytest.approx(0.0)  # gold is among the ids everywhere
    assert d["tail_mass"] == pytest.approx(0.1, abs=1e-5)
    assert d["positions"] == 6 and d["gated_share"] == 0.0


def test_split_rows_trains_every_position_once():
    n, k, seq = 11, 2, 4
    inp = np.arange(100, 100 + n)
    t_ids = np.arange(n - 1)[:, None].repeat(k, 1)  # teacher row t tagged with t
    rows = split_rows(inp, [t_ids, t_ids.astype(np.float32), None], seq)
    assert all(len(r[0]) <= seq for r in rows)
    seen = []
    for ids, (ti, _, none) in rows:
        assert none is None
        assert ti.shape[0] == len(ids) - 1
        for t in range(len(ids) - 1):
            pos = int(ti[t, 0])  # the teacher row stays with the token it predicts from
            assert inp[pos] == ids[t] and inp[pos + 1] == ids[t + 1]
            seen.append(pos)
    assert sorted(seen) == list(range(n - 1))
    assert len(split_rows(inp, [None, None], 64)) == 1


def test_build_examples_control_has_same_rows_without_teacher():
    s = two_sources()
    joined = join_sources(s)
    fused = build_examples(joined, list(s), FusionSpec(), 3)
    control = build_examples(joined, list(s), None, 3)
    assert [(e.hash, e.part, e.input_ids.tolist()) for e in fused.examples] == [
        (e.hash, e.part, e.input_ids.tolist()) for e in control.examples
    ]
    assert all(e.teacher_ids is None for e in control.examples)
    assert fused.split_blocks == 1 and len(fused.examples) == 2


def test_collate_pads_to_longest_with_ignored_labels():
    lp = np.array([[np.log(0.6), np.log(0.4)], [0.0, -np.inf]], np.float32)
    e1 = TrainExample("a", "a", 0, np.array([1, 2, 3]), np.array([[2, 5], [3, -1]]), lp)
    e2 = TrainExample("b", "b", 0, np.array([4, 5]), np.array([[5]]), np.array([[0.0]]))
    b = collate([e1, e2], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [4, 5, IGNORE_INDEX]]
    assert b["teacher_ids"].shape == (2, 3, 2)
    assert b["teacher_ids"][0].tolist() == [[2, 5], [3, -1], [-1, -1]]
    assert b["teacher_ids"][1].tolist() == [[5, -1], [-1, -1], [-1, -1]]
    assert torch.isinf(b["teacher_logprobs"][1, 1:]).all()
    assert int(b["clm_tokens"]) == 3 and int(b["fusion_tokens"]) == 3
    # The loss function agrees with the collator's counts.
    _, parts = combined_loss(
        torch.randn(2, 3, 8), b["labels"], b["teacher_ids"], b["teacher_logprobs"], lam=0.5
    )
    assert int(parts["clm_tokens"]) == 3 and int(parts["fusion_tokens"]) == 3
    assert "teacher_ids" not in collate([e1, e2], with_teacher=False)


def test_plan_is_deterministic_and_covers_each_epoch():
    lengths = [3 + (i * 7) % 20 for i in range(23)]
    steps = count_steps(len(lengths), 4, epochs=2.0, max_steps=0)
    assert steps == 12  # ceil(2 * 23 / 4)
    plan = plan_steps(lengths, steps=steps, micro_batch=2, grad_accum=2, seed=3)
    assert plan == plan_steps(lengths, steps=steps, micro_batch=2, grad_accum=2, seed=3)
    assert plan != plan_steps(lengths, steps=steps, micro_batch=2, grad_accum=2, seed=4)
    flat = [i for step in plan for micro in step for i in micro]
    assert len(flat) == steps * 4
    counts = np.bincount(flat, minlength=23)
    assert counts.min() >= 2 and counts.max() <= 3  # two epochs (+ the start of a third)
    # Bucketing: within a micro-batch, lengths are adjacent in sorted order of the window.
    for step in plan:
        assert all(len(m) == 2 for m in step)


def test_plan_depends_only_on_the_global_batch():
    lengths = [5 + i % 9 for i in range(40)]
    one = plan_steps(lengths, steps=5, micro_batch=2, grad_accum=1, seed=0)  # 1 proc x 2
    acc = plan_steps(lengths, steps=5, micro_batch=1, grad_accum=2, seed=0)  # 1 x 1 x 2 accum
    assert [sorted(sum(s, [])) for s in one] == [sorted(sum(s, [])) for s in acc]
    # Two processes with batch 1 each take one row of every global micro-batch of 2.
    for step in one:
        for micro in step:
            assert sorted(rank_slice(micro, 0, 2) + rank_slice(micro, 1, 2)) == sorted(micro)


def test_max_steps_beyond_one_epoch():
    plan = plan_steps([4, 5, 6], steps=5, micro_batch=1, grad_accum=1, seed=0)
    assert len(plan) == 5 and count_steps(3, 1, 1.0, 5) == 5
