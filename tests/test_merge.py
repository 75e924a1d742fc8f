"""Weight merging: the rules' properties on tensors, and the `fuselm merge` stage on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuselm.artifacts import PENDING, StageError
from fuselm.config import ConfigError, load_config
from fuselm.merge.methods import MERGE_METHODS, MergeParams, get_merge_method, sce_weights
from fuselm.merge.stage import run_merge
from fuselm.testing import build_tokenizer, save_tiny_model

W = torch.ones(2)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_identical_models_equal_base_give_the_base(name, density):
    # tau = 0 for every model: every rule returns the base whatever it trims or drops.
    theta = _rand(4, 5)
    out = get_merge_method(name)(
        torch.stack([theta, theta]), theta, W, MergeParams(density=density, seed=1), "w"
    )
    torch.testing.assert_close(out, theta)


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_identical_models_give_that_model(name):
    base, theta = _rand(4, 5, seed=1), _rand(4, 5, seed=2)
    out = get_merge_method(name)(torch.stack([theta, theta]), base, W, MergeParams(), "w")
    torch.testing.assert_close(out, theta)


def test_sce_one_task_vector_is_pivot_plus_vector():
    base, theta = _rand(6, 3, seed=3), _rand(6, 3, seed=4)
    for density in (1.0, 0.2):  # one model: no variance to select by, everything kept
        out = get_merge_method("sce")(
            theta[None], base, torch.ones(1), MergeParams(density=density), "w"
        )
        torch.testing.assert_close(out, base + (theta - base))
    half = get_merge_method("sce")(theta[None], base, torch.ones(1), MergeParams(scale=0.5), "w")
    torch.testing.assert_close(half, base + 0.5 * (theta - base))


def test_sce_weights_selection_and_erase_by_hand():
    base = torch.zeros(4)
    t1 = torch.tensor([1.0, -2.0, 0.5, 0.0])
    t2 = torch.tensor([3.0, 1.0, 0.5, 0.0])
    w = sce_weights(torch.stack([t1, t2]))
    m1, m2 = (t1**2).mean(), (t2**2).mean()
    torch.testing.assert_close(w, torch.stack([m1, m2]) / (m1 + m2))
    out = get_merge_method("sce")(torch.stack([t1, t2]), base, W, MergeParams(), "w")
    # element 1: sum = -1 -> majority negative: t2's +1 is erased, t1's -2 kept.
    expect = torch.stack([w[0] * 1 + w[1] * 3, w[0] * -2, w[0] * 0.5 + w[1] * 0.5, 0 * w[0]])
    torch.testing.assert_close(out, expect)
    # select: density 0.25 keeps only the element of largest variance (element 1).
    sel = get_merge_method("sce")(torch.stack([t1, t2]), base, W, MergeParams(density=0.25), "w")
    assert sel[0] == 0 and sel[2] == 0 and sel[1] < 0


def test_ties_and_dare_by_hand():
    base = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, -1.0, 4.0]), torch.tensor([3.0, 2.0, -1.0])
    out = get_merge_method("ties")(torch.stack([t1, t2]), base, W, MergeParams(), "w")
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 4.0]))
    p = MergeParams(density=0.5, seed=7)
    a = get_merge_method("dare")(torch.stack([t1, t2]), base, W, p, "x")
    b = get_merge_method("dare")(torch.stack([t1, t2]), base, W, p, "x")
    torch.testing.assert_close(a, b)  # seeded
    big = torch.ones(2, 20000)
    drop = get_merge_method("dare")(big, torch.zeros(20000), W, p, "y")
    assert 0.9 < float(drop.mean()) < 1.1  # unbiased rescale
    assert float((drop == 0).float().mean()) > 0.1


def test_slerp_endpoints_and_refusal():
    a, b = _rand(8, seed=5), _rand(8, seed=6)
    f = get_merge_method("slerp")
    torch.testing.assert_close(f(torch.stack([a, b]), None, W, MergeParams(slerp_t=0.0), ""), a)
    torch.testing.assert_close(f(torch.stack([a, b]), None, W, MergeParams(slerp_t=1.0), ""), b)
    with pytest.raises(ValueError, match="exactly 2"):
        f(torch.stack([a, b, a]), None, torch.ones(3), MergeParams(), "")


def test_unknown_method_and_bad_config(write_config):
    with pytest.raises(ValueError, match="known"):
        get_merge_method("average")
    with pytest.raises(ConfigError, match="merge.method"):
        load_config(write_config({"merge": {"method": "avg"}}))
    with pytest.raises(ConfigError, match="density"):
        load_config(write_config({"merge": {"density": 0}}))
    with pytest.raises(ConfigError, match="weights"):
        load_config(write_config({"merge": {"method": "sce", "weights": [1, 2]}}))
    with pytest.raises(ConfigError, match="one weight per model"):
        load_config(write_config({"merge": {"models": ["a", "b"], "weights": [1.0]}}))


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def merge_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    tok = build_tokenizer("bpe")
    return {
        "base": save_tiny_model(root / "base", tok, seed=0),
        "a": save_tiny_model(root / "a", tok, seed=1),
        "b": save_tiny_model(root / "b", tok, seed=2),
        "gpt2": save_tiny_model(root / "gpt2", tok, arch="gpt2", seed=1),
        "wide": save_tiny_model(root / "wide", tok, hidden=48, seed=1),
    }


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _cfg(write_config, tmp_path, **merge):
    return load_config(write_config({"run_dir": str(tmp_path / "run"), "merge": merge}))


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_stage_identical_models_same_weights(method, merge_models, write_config, tmp_path):
    a = str(merge_models["a"])
    cfg = _cfg(write_config, tmp_path, method=method, models=[a, a], base=str(merge_models["base"]))
    man = run_merge(cfg, tmp_path / "run")
    got, want = _weights(tmp_path / "run" / "merge" / "model"), _weights(merge_models["a"])
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert man["stats"]["tensors"] == len(want)


def test_stage_sharded_resume_skip_and_loads(merge_models, write_config, tmp_path):
    from transformers import AutoModelForCausalLM

    models = [str(merge_models["a"]), str(merge_models["b"])]
    cfg = _cfg(
        write_config,
        tmp_path,
        method="ties",
        models=models,
        base=str(merge_models["base"]),
        density=0.5,
        max_shard_mb=0.02,
    )
    run = tmp_path / "run"
    man = run_merge(cfg, run)
    out = run / "merge" / "model"
    assert man["stats"]["shards"] > 1 and (out / "model.safetensors.index.json").exists()
    first = _weights(out)
    model = AutoModelForCausalLM.from_pretrained(out)  # a normal HF folder
    assert model.config.model_type == "llama"
    # skipped when done
    assert run_merge(cfg, run)["finished"] == man["finished"]
    # interrupted: drop the manifest and a shard -> only that shard is redone, same result
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    manifest = json.loads((run / "merge" / "manifest.json").read_text())
    (run / "merge" / "manifest.json").unlink()
    (run / "merge" / PENDING).write_text(
        json.dumps(
            {
                "fingerprint": manifest["fingerprint"],
                "components": manifest["components"],
                "shards": [],
            }
        )
    )
    again = run_merge(cfg, run)
    assert again["stats"]["shards_written"] == 1
    for k, v in _weights(out).items():
        torch.testing.assert_close(v, first[k])
    # another config is refused as stale, not silently reused
    stale = _cfg(write_config, tmp_path, method="linear", models=models)
    with pytest.raises(StageError, match="different inputs"):
        run_merge(stale, run)


@pytest.mark.parametrize("other", ["gpt2", "wide"])
def test_stage_refuses_different_architectures(other, merge_models, write_config, tmp_path):
    cfg = _cfg(
        write_config,
        tmp_path,
        method="linear",
        models=[str(merge_models["a"]), str(merge_models[other])],
    )
    with pytest.raises(StageError, match="architecture|different sizes"):
        run_merge(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "merge" / "manifest.json").exists()


def test_stage_failure_modes(merge_models, write_config, tmp_path):
    a = str(merge_models["a"])
    with pytest.raises(StageError, match="nothing to merge"):
        run_merge(_cfg(write_config, tmp_path, method="linear"), tmp_path / "run")
    with pytest.raises(StageError, match="exactly 2"):
        run_merge(_cfg(write_config, tmp_path, method="slerp", models=[a, a, a]), tmp_path / "run")
    with pytest.raises(StageError, match="base"):
        run_merge(_cfg(write_config, tmp_path, method="sce", models=[a, a]), tmp_path / "run")
    with pytest.raises(StageError, match="local model folder"):
        run_merge(
            _cfg(write_config, tmp_path, method="linear", models=[a, "org/hub-name"]),
            tmp_path / "run",
        )
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    with pytest.raises(StageError, match="safetensors"):
        run_merge(
            _cfg(write_config, tmp_path, method="linear", models=[a, str(bad)]), tmp_path / "run"
        )
    # an integer buffer is copied, a float tensor merged
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "x"}))
    save_file({"w": torch.ones(2), "ids": torch.arange(3)}, str(odd / "model.safetensors"))
    cfg = _cfg(write_config, tmp_path, method="linear", models=[str(odd), str(odd)])
    run_merge(cfg, tmp_path / "run2")
    got = _weights(tmp_path / "run2" / "merge" / "model")
    assert torch.equal(got["ids"], torch.arange(3)) and torch.equal(got["w"], torch.ones(2))


def test_config_names_every_registered_method():
    from typing import get_args, get_type_hints

    from fuselm.config import MergeConfig

    assert set(get_args(get_type_hints(MergeConfig)["method"])) == set(MERGE_METHODS)
