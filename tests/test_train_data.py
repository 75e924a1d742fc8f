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
) -> AlignedBlock:
    input_ids = np.asarray(input_ids, np.int32)
    ids = np.asarray(ids, np.int32)
    p = len(input_ids) - 1
    return AlignedBlock(
        hash=h,
        block_id=f"doc#{h}",
        domain="d",
        split=split,
        input_ids=input_ids,
        ids=ids,
        logprobs=np.asarray(logprobs, np.float32),
        valid=np.ones(p, bool) if valid is None else np.asarray(valid, bool),
        gold=np.full(p, -1.0, np.float32) if gold is None else np.asarray(gold, np.float32),
        next_bytes=np.ones(p, np.int32) if next_bytes is None else np.asarray(next_bytes, np.int32),
        nll_sum=nll[0],
        nll_bytes=nll[1],
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


def test_split_rows_trains_every_position_once():
    n, k, seq = 11, 2, 4
    inp = np.arange(100, 100 + n)
    t_ids = np.arange(n - 1)[:, None].repeat(k, 1)  # teacher row t tagged with t
    rows = split_rows(inp, t_ids, t_ids.astype(np.float32), seq)
    assert all(len(r[0]) <= seq for r in rows)
    seen = []
    for ids, ti, _ in rows:
        assert ti.shape[0] == len(ids) - 1
        for t in range(len(ids) - 1):
            pos = int(ti[t, 0])  # the teacher row stays with the token it predicts from
            assert inp[pos] == ids[t] and inp[pos + 1] == ids[t + 1]
            seen.append(pos)
    assert sorted(seen) == list(range(n - 1))
    assert len(split_rows(inp, None, None, 64)) == 1


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
