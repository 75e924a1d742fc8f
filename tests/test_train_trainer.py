"""The training loop: loss equivalences, learning, batch-split invariance, resume, control."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fuselm.train.batching import collate
from fuselm.train.data import TrainExample
from fuselm.train.losses import combined_loss
from fuselm.train.step import (
    STEP_SUMS,
    TrainingError,
    TrainSettings,
    lr_factor,
    micro_batch_loss,
    warmup_steps,
)
from fuselm.train.trainer import LOG_FILE, Trainer, TrainingInterrupted


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: thread start-up costs more than it saves, and on a busy 2-core machine
    two spinning OpenMP threads per process slow a step down a hundredfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


V = 48


def tiny_model(seed: int = 0, dropout: float = 0.0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=dropout,
    )
    return AutoModelForCausalLM.from_config(cfg)


def examples(n: int = 12, k: int = 4, seed: int = 0, teacher: bool = True) -> list[TrainExample]:
    """Rows of 6..16 tokens with a fixed random sparse teacher per position."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 17))
        ids = rng.integers(0, V, length)
        t_ids = np.stack([rng.permutation(V)[:k] for _ in range(length - 1)]).astype(np.int32)
        logits = rng.normal(size=(length - 1, k)) * 2
        t_lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
        out.append(
            TrainExample(
                f"h{i}", f"doc#{i}", 0, ids, t_ids if teacher else None, t_lp if teacher else None
            )
        )
    return out


def settings(**kw) -> TrainSettings:
    base = dict(
        lam=0.9,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        max_steps=6,
        batch_size=2,
        precision="float32",
        seed=1,
        weight_decay=0.0,
    )
    base.update(kw)
    return TrainSettings(**base)


def run(tmp, model, exs, s, fp="fp", **kw):
    trainer = Trainer(lambda d: copy.deepcopy(model).to(d), exs, s, tmp, fingerprint=fp, **kw)
    return trainer.train()


def weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def log_lines(path):
    return [json.loads(x) for x in (path / LOG_FILE).read_text().splitlines()]


def test_lambda_one_equals_the_models_own_clm_loss():
    model = tiny_model()
    exs = examples(3)
    batch = collate(exs, with_teacher=False)  # rows of different lengths: padding
    n_c = float(batch["clm_tokens"])
    loss, sums = micro_batch_loss(model, batch, settings(lam=1.0), n_c, 0.0)
    part = dict(zip(STEP_SUMS, sums.tolist(), strict=True))
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert part["clm"] / n_c == pytest.approx(float(ref.detach()), rel=1e-5)
    assert part["fusion"] == 0.0


def test_one_micro_batch_loss_is_the_combined_loss():
    model = tiny_model()
    batch = collate(examples(3))
    n_c, n_f = float(batch["clm_tokens"]), float(batch["fusion_tokens"])
    loss, sums = micro_batch_loss(model, batch, settings(lam=0.7), n_c, n_f)
    part = dict(zip(STEP_SUMS, sums.tolist(), strict=True))
    logits = model(input_ids=batch["input_ids"]).logits
    ref, parts = combined_loss(
        logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"], lam=0.7
    )
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert part["fusion"] / n_f == pytest.approx(float(parts["fusion"]), rel=1e-5)
    assert part["gold_inside"] + part["gold_outside"] == n_f


def test_grad_balanced_gives_each_term_its_share_of_the_gradient():
    model = tiny_model()
    batch = collate(examples(3))
    n_c, n_f = float(batch["clm_tokens"]), float(batch["fusion_tokens"])
    s = settings(lam=0.5, loss_weighting="grad_balanced", tail_bucket=True)
    loss, sums = micro_batch_loss(model, batch, s, n_c, n_f)
    lam = dict(zip(STEP_SUMS, sums.tolist(), strict=True))["lam"] / n_c
    logits = model(input_ids=batch["input_ids"]).logits
    kw = dict(tail_bucket=True, teacher_tail_logmass=batch["teacher_tail_logmass"])
    args = (logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"])
    g_c = torch.autograd.grad(combined_loss(*args, lam=1.0, **kw)[0], logits)[0]
    g_f = torch.autograd.grad(combined_loss(*args, lam=0.0, **kw)[0], logits)[0]
    # The weighted gradients have equal norms (0.5 = equal shares of the magnitude).
    assert float((lam * g_c).norm()) == pytest.approx(float(((1 - lam) * g_f).norm()), rel=1e-4)
    ref, _ = combined_loss(*args, lam=lam, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert 0.0 < lam < 1.0


def test_lr_schedule():
    assert warmup_steps(100, 0.01) == 1 and warmup_steps(100, 0.0) == 0
    f = [lr_factor(i, 10, 2, "cosine") for i in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0  # first update not at lr 0
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False)) and f[-1] > 0
    assert lr_factor(5, 10, 0, "constant") == 1.0
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)


def test_training_reduces_the_fusion_loss_on_a_fixed_batch(tmp_path):
    model = tiny_model()
    exs = examples(8)
    batch = collate(exs[:4])

    def fusion_of(m):
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"]).logits
            return float(
                combined_loss(
                    logits,
                    batch["labels"],
                    batch["teacher_ids"],
                    batch["teacher_logprobs"],
                    lam=0.0,
                )[1]["fusion"]
            )

    before = fusion_of(model)
    res = run(tmp_path, model, exs, settings(lam=0.5, max_steps=15, learning_rate=1e-2))
    trained = copy.deepcopy(model)
    trained.load_state_dict(weights(tmp_path), strict=False)
    after = fusion_of(trained)
    assert after < before - 0.2, (before, after)
    lines = log_lines(tmp_path)
    assert len(lines) == 15 == res.steps
    assert {"clm", "fusion", "total", "lr", "tokens", "fusion_tokens", "rows"} <= set(lines[0])
    assert all(x["total"] == pytest.approx(0.5 * x["clm"] + 0.5 * x["fusion"]) for x in lines)
    assert (tmp_path / "model" / "config.json").is_file()
    assert not (tmp_path / "checkpoints").exists()  # removed once the model is saved


def test_step_does_not_depend_on_how_the_global_batch_is_split(tmp_path):
    # batch 2 x accumulation 1 == batch 1 x accumulation 2 (token-weighted objective).
    model = tiny_model()
    exs = examples(10)
    run(tmp_path / "a", model, exs, settings(batch_size=2, grad_accum=1, max_steps=4))
    run(tmp_path / "b", model, exs, settings(batch_size=1, grad_accum=2, max_steps=4))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    # Adam normalises updates, so float-order noise in near-zero gradients shows up at a
    # few 1e-6; the updates themselves are ~1e-2 (lr 5e-3 x 4 steps).
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=5e-5)
    la, lb = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    assert [x["rows"] for x in la] != [] and [x["tokens"] for x in la] == [x["tokens"] for x in lb]
    for x, y in zip(la, lb, strict=True):
        assert x["clm"] == pytest.approx(y["clm"], rel=1e-5)
        assert x["fusion"] == pytest.approx(y["fusion"], rel=1e-5)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    model = tiny_model(dropout=0.2)  # dropout: the RNG state must be restored too
    exs = examples(10)
    s = settings(max_steps=6, save_steps=2, warmup_ratio=0.2)
    full = run(tmp_path / "full", model, exs, s)
    assert full.resumed_from == 0
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        run(part, model, exs, s, stop_after=3)
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-0000002"]
    assert len(log_lines(part)) == 3
    with pytest.raises(TrainingError, match="checkpoint of another run"):
        run(part, model, exs, s, fp="other")
    resumed = run(part, model, exs, s)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    assert resumed.tokens == full.tokens
    wf, wp = weights(tmp_path / "full"), weights(part)
    for k in wf:
        torch.testing.assert_close(wf[k], wp[k], rtol=0, atol=1e-6)
    lf, lp = log_lines(tmp_path / "full"), log_lines(part)
    assert [x["step"] for x in lp] == list(range(1, 7))  # no duplicated step 3
    for x, y in zip(lf, lp, strict=True):
        assert x["rows"] == y["rows"] and x["lr"] == y["lr"]
        assert x["total"] == pytest.approx(y["total"], rel=1e-6)


def test_control_and_fused_see_the_same_batches(tmp_path):
    model = tiny_model()
    fused = run(tmp_path / "f", model, examples(9), settings(lam=0.9, max_steps=5))
    control = run(tmp_path / "c", model, examples(9, teacher=False), settings(lam=1.0, max_steps=5))
    lf, lc = log_lines(tmp_path / "f"), log_lines(tmp_path / "c")
    assert [x["rows"] for x in lf] == [x["rows"] for x in lc]
    assert [x["tokens"] for x in lf] == [x["tokens"] for x in lc]
    assert fused.steps == control.steps == 5
    assert all(x["fusion"] is None for x in lc) and control.final_fusion is None
    assert lf[0]["clm"] == pytest.approx(lc[0]["clm"])  # same start, same first batch


def test_bad_settings():
    with pytest.raises(TrainingError, match=r"\[0, 1\]"):
        settings(lam=1.5)
    with pytest.raises(TrainingError, match="no teacher"):
        Trainer(lambda d: None, examples(2, teacher=False), settings(lam=0.5), "x", fingerprint="f")


def heldout_set(n: int = 6, seed: int = 5):
    from fuselm.train.heldout import HeldOut, HeldOutBlock

    rng = np.random.default_rng(seed)
    blocks = [
        HeldOutBlock(f"v{i}", "ab"[i % 2], rng.integers(0, V, 12).astype(np.int64), 20)
        for i in range(n)
    ]
    return HeldOut(blocks)


def test_heldout_measurements_do_not_change_training(tmp_path):
    model = tiny_model(dropout=0.2)
    exs = examples(10)
    plain = run(tmp_path / "plain", model, exs, settings(max_steps=6))
    s = settings(max_steps=6, eval_every=2)
    measured = run(tmp_path / "m", model, exs, s, heldout=heldout_set())
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "m")
    for k in wa:  # eval mode, no gradient, no RNG drawn: the same training
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    lines = log_lines(tmp_path / "m")
    points = [(x["step"], x["heldout_bpb"]) for x in lines if "heldout_bpb" in x]
    assert [p[0] for p in points] == [0, 2, 4, 6]  # before the first step, then every 2
    assert set(points[0][1]) == {"a", "b", "all"} and all(v > 0 for v in points[0][1].values())
    assert measured.heldout_bits_per_byte == points[-1][1] and measured.best_step is None
    assert plain.heldout_bits_per_byte is None


def test_keep_best_saves_the_best_measured_weights(tmp_path):
    from accelerate import Accelerator

    model = tiny_model()
    # A learning rate so large that training ruins the held-out fit: the best is early.
    s = settings(max_steps=6, eval_every=2, keep_best=True, learning_rate=0.5)
    res = run(tmp_path / "kb", model, examples(10), s, heldout=heldout_set())
    lines = log_lines(tmp_path / "kb")
    points = {x["step"]: x["heldout_bpb"]["all"] for x in lines if "heldout_bpb" in x}
    best_step = min(points, key=points.get)
    assert res.best_step == best_step < 6
    assert res.best_heldout_bits_per_byte == points[best_step]
    assert not (tmp_path / "kb" / "best").exists()  # moved into model/
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "kb" / "model")
    again = heldout_set().measure(saved, Accelerator(cpu=True), contextlib.nullcontext)
    assert again["all"] == pytest.approx(points[best_step], abs=1e-5)
    with pytest.raises(TrainingError, match="keep_best needs held-out measurements"):
        run(tmp_path / "x", model, examples(4), settings(max_steps=2, keep_best=True))
    with pytest.raises(TrainingError, match="no held-out blocks"):
        run(tmp_path / "y", model, examples(4), settings(max_steps=2, eval_every=1))
