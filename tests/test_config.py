from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fuselm.config import (
    ConfigError,
    PipelineConfig,
    from_dict,
    load_config,
    reference_yaml,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_but_the_fusion_recipe():
    cfg = PipelineConfig()
    # The fusion term follows bench/reproduce/RESULTS-transfer.md (won on validation) ...
    assert cfg.train.clm_weight == 0.5 and cfg.train.temperature == 2.0
    assert cfg.train.tail_bucket and cfg.train.temperature_squared
    assert cfg.fuse.gate == "auto"
    # ... and configs/paper.yaml keeps the paper's recipe one file away.
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    assert paper["train"]["clm_weight"] == 0.9 and paper["train"]["temperature"] == 1.0
    assert paper["train"]["tail_bucket"] is False and paper["fuse"]["gate"] == "none"
    assert cfg.capture.top_k == 10
    assert cfg.fuse.function == "min_ce"
    assert cfg.align.vocab == "mined"
    assert cfg.corpus.block_tokens == 2048 and cfg.train.seq_len == 2048
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2) == (0.9, 0.95)
    assert cfg.train.weight_decay == 0.1 and cfg.train.learning_rate == 1e-5
    assert cfg.train.warmup_ratio == 0.01 and cfg.train.max_grad_norm == 1.0
    assert cfg.train.epochs == 1.0
    assert cfg.align.fallback == "one_hot_next"  # the NEXT token, never the current one


def test_every_section_exists():
    cfg = PipelineConfig()
    for section in ("corpus", "sources", "target", "capture", "align", "fuse", "train", "eval"):
        assert hasattr(cfg, section)


def test_yaml_and_overrides(write_config, tmp_path):
    (tmp_path / "data").mkdir()
    path = write_config(
        {
            "corpus": {"inputs": [{"path": "data", "domain": "code"}]},
            "target": {"model": "org/target"},
            "sources": [{"model": "org/llama"}, {"model": "org/mpt", "name": "mpt"}],
            "train": {"learning_rate": "2e-5"},
        }
    )
    cfg = load_config(
        path,
        [
            "sources.llama.dtype=bfloat16",
            "sources.1.bos=none",
            "train.clm_weight=0.5",
            "capture.top_k=20",
            "eval.lm_eval_tasks=[arc_easy, boolq]",
        ],
    )
    assert cfg.train.learning_rate == 2e-5  # YAML 1.1 reads 2e-5 as a string
    assert cfg.sources[0].dtype == "bfloat16" and cfg.sources[1].bos == "none"
    assert cfg.train.clm_weight == 0.5 and cfg.capture.top_k == 20
    assert cfg.eval.lm_eval_tasks == ["arc_easy", "boolq"]
    # relative local paths resolve against the YAML's folder; hub names stay untouched
    assert cfg.corpus.inputs[0].path == str((tmp_path / "data").resolve())
    assert cfg.target.model == "org/target"
    assert [m.resolved_name() for m in cfg.teachers()] == ["target", "llama", "mpt"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["train.lerning_rate=1"],
            ["unknown key 'train.lerning_rate'", "did you mean 'learning_rate'"],
        ),
        (["trian.lr=1"], ["unknown key 'trian'", "did you mean 'train'"]),
        (
            ["align.method=offset"],
            ["align.method", "'offset'", "offsets, mined_dp", "did you mean 'offsets'"],
        ),
        (["train.clm_weight=1.5"], ["train.clm_weight", "1.5", "[0, 1]"]),
        (["capture.top_k=many"], ["capture.top_k", "'many'", "integer"]),
        (["train.tail_bucket=maybe"], ["train.tail_bucket", "true or false"]),
        (["corpus.validation_fraction=1"], ["corpus.validation_fraction", "[0, 1)"]),
        (["sources.nosuch.dtype=float16"], ["no list item named 'nosuch'", "have: llama"]),
        (["sources.5.dtype=float16"], ["index 5 out of range"]),
        (["sources.0.dtype=fp8"], ["sources[0].dtype", "auto, float32, bfloat16, float16"]),
        (["sources.0.device=gpu"], ["sources[0].device", "cuda:N"]),
        (["train.lr"], ["expected section.field=value"]),
        # Options that used to be accepted and ignored (eval.unit) or refused at train time
        # (fuse.ce_unit: char) are gone: bits per byte is the one unit.
        (["eval.unit=char"], ["unknown key 'eval.unit'"]),
        (["fuse.ce_unit=char"], ["unknown key 'fuse.ce_unit'"]),
        (["fuse.gate=sometimes"], ["fuse.gate", "teacher_better"]),
        (["train.loss_weighting=magic"], ["train.loss_weighting", "grad_balanced"]),
        (["fuse.gate=teacher_better", "target.as_source=false"], ["needs the target captured"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(write_config, overrides, expected):
    path = write_config({"target": {"model": "org/t"}, "sources": [{"model": "org/llama"}]})
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    for fragment in expected:
        assert fragment in str(err.value)


def test_typo_in_yaml_list_item(write_config):
    path = write_config({"corpus": {"inputs": [{"path": "x", "domian": "code"}]}})
    with pytest.raises(ConfigError, match=r"corpus\.inputs\[0\]\.domian.*did you mean 'domain'"):
        load_config(path)


def test_input_needs_exactly_one_origin(write_config):
    path = write_config({"corpus": {"inputs": [{"domain": "code"}]}})
    with pytest.raises(
        ConfigError, match=r"corpus\.inputs\[0\].*exactly one of `path` or `hf_dataset`"
    ):
        load_config(path)


def test_duplicate_source_names(write_config):
    path = write_config({"target": {"model": "a/m"}, "sources": [{"model": "b/m"}]})
    with pytest.raises(ConfigError, match="duplicate model names"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    bad.write_text("train: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_dict():
    cfg = load_config(None, ["target.model=org/t", "sources=[{model: org/s}]"])
    again = from_dict(PipelineConfig, to_dict(cfg))
    assert again == cfg


def test_reference_yaml_is_in_sync():
    """configs/reference.yaml documents every field; regenerate it if this fails."""
    committed = (REPO / "configs" / "reference.yaml").read_text(encoding="utf-8")
    assert committed == reference_yaml(), (
        "configs/reference.yaml is out of date: python -c 'from fuselm.config import "
        'reference_yaml; print(reference_yaml(), end="")\' > configs/reference.yaml'
    )


def test_every_field_is_documented():
    import dataclasses

    from fuselm import config as c

    for cls in (
        c.CorpusInput,
        c.CorpusConfig,
        c.ModelConfig,
        c.TargetConfig,
        c.CaptureConfig,
        c.AlignConfig,
        c.FuseConfig,
        c.TrainConfig,
        c.EvalConfig,
        c.PipelineConfig,
    ):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_example_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name != "reference.yaml":
            load_config(path)


def test_accelerate_configs_load():
    """The shipped accelerate configs use field names accelerate knows (a typo would fail)."""
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        cfg = load_config_from_file(str(path))
        kinds[path.stem] = str(cfg.distributed_type)
    assert set(kinds) == {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"}
    assert "DEEPSPEED" in kinds["deepspeed-zero3"] and "FSDP" in kinds["fsdp"]


def test_fuse_gate_auto_follows_whether_the_target_is_a_source(write_config):
    path = write_config({"target": {"model": "org/t"}, "sources": [{"model": "org/llama"}]})
    assert load_config(path).fusion_gate() == "teacher_better"  # the target is source #0
    off = load_config(path, ["target.as_source=false"])
    assert off.fuse.gate == "auto" and off.fusion_gate() == "none"
    assert load_config(path, ["fuse.gate=none"]).fusion_gate() == "none"
