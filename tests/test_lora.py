"""LoRA (peft) for the target: what trains, what is saved, resume, and a whole run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_trainer import examples, settings, tiny_model

from fuselm.cli import main
from fuselm.config import LoraConfig, ModelConfig
from fuselm.models import load_causal_lm
from fuselm.train.trainer import Trainer, TrainingError, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"rank": 4, "alpha": 8.0, "dropout": 0.0, **kw})


def run(tmp, model, s, **kw):
    return Trainer(
        lambda d: copy.deepcopy(model).to(d), examples(8), s, tmp, fingerprint="f", **kw
    ).train()


def test_only_the_adapter_trains_and_the_merge_is_saved(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(tmp_path / "m", model, settings(max_steps=4, lora=lora()))
    merged = load_file(str(tmp_path / "m" / "model" / "model.safetensors"))
    # A plain model folder (no LoRA names); the adapted projections changed, the rest not.
    assert not any("lora" in k for k in merged)
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed


def test_adapter_output_loads_like_the_merge(tmp_path):
    model = tiny_model()
    base = tmp_path / "base"
    model.save_pretrained(base)  # the adapter names its base by path
    base_model = load_causal_lm(ModelConfig(model=str(base)), dtype=torch.float32)

    def go(name, save):
        return Trainer(
            lambda d: copy.deepcopy(base_model).train().to(d),
            examples(8),
            settings(max_steps=3, lora=lora(save=save)),
            tmp_path / name,
            fingerprint=name,
        ).train()

    go("merged", "merged")
    go("adapter", "adapter")
    files = {p.name for p in (tmp_path / "adapter" / "model").iterdir()}
    assert "adapter_config.json" in files and "config.json" not in files
    a = load_causal_lm(ModelConfig(model=str(tmp_path / "adapter" / "model")), dtype=torch.float32)
    m = load_causal_lm(ModelConfig(model=str(tmp_path / "merged" / "model")), dtype=torch.float32)
    ids = torch.tensor([examples(1)[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-5)


def test_lora_resume_equals_uninterrupted(tmp_path):
    model = tiny_model()
    s = settings(max_steps=5, save_steps=2, lora=lora())
    run(tmp_path / "full", model, s)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "part", model, s, stop_after=3)
    assert run(tmp_path / "part", model, s).resumed_from == 2
    wf = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    wp = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    for k in wf:
        torch.testing.assert_close(wf[k], wp[k], rtol=0, atol=1e-6)


def test_unknown_target_module_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="train.lora: .*nope"):
        run(tmp_path / "x", tiny_model(), settings(max_steps=1, lora=lora(target_modules=["nope"])))


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_run_with_lora_trains_and_evaluates_both_variants(
    base_config, write_config, tmp_path, save
):
    train = dict(base_config["train"], lora={"rank": 4, "alpha": 8, "save": save})
    cfg = dict(base_config, sources=base_config["sources"][:1], train=train)
    run_dir = tmp_path / "run"
    assert main(["-q", "run", str(write_config(cfg)), "-o", str(run_dir)]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    kinds = {r["kind"]: r for r in results["models"].values()}
    for kind in ("fused", "control"):
        assert kinds[kind]["overall"]["bits_per_byte"] > 0
        card = (run_dir / "train" / kind / "model" / "README.md").read_text()
        assert "LoRA (peft): rank 4" in card
        assert ("ADAPTER only" in card) == (save == "adapter")
    # The control trained the same adapter settings (its identity includes them).
    man = json.loads((run_dir / "train" / "control" / "manifest.json").read_text())
    assert man["components"]["train"]["lora"]["rank"] == 4
