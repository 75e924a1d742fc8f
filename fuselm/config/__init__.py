"""Pipeline configuration: one dataclass per stage, loaded from YAML plus ``a.b=c`` overrides.

The package re-exports the public names of :mod:`~fuselm.config.sections` (the dataclasses)
and :mod:`~fuselm.config.loading` (YAML, overrides, reference), so callers import from
``fuselm.config``.

Every field is documented where it is defined (the ``help`` metadata, which also feeds
``configs/reference.yaml``) and defaults to the FuseLLM paper's setting (arXiv 2401.10491,
SPEC.md section 1) unless noted. Why hand-rolled instead of a config framework: the
errors matter more than the features. A user with a typo'd key or a wrong value gets the
full YAML key, the bad value, what is allowed, and a did-you-mean, before any model loads.
"""

from fuselm.config.loading import (
    apply_override,
    from_dict,
    load_config,
    parse_override,
    reference_yaml,
    to_dict,
)
from fuselm.config.sections import (
    DTYPES,
    SECTIONS,
    AlignConfig,
    CaptureConfig,
    ConfigError,
    CorpusConfig,
    CorpusInput,
    EvalConfig,
    FuseConfig,
    LoraConfig,
    MergeConfig,
    ModelConfig,
    PipelineConfig,
    TargetConfig,
    TrainConfig,
)

__all__ = [
    "DTYPES",
    "SECTIONS",
    "AlignConfig",
    "CaptureConfig",
    "ConfigError",
    "CorpusConfig",
    "CorpusInput",
    "EvalConfig",
    "FuseConfig",
    "LoraConfig",
    "MergeConfig",
    "ModelConfig",
    "PipelineConfig",
    "TargetConfig",
    "TrainConfig",
    "apply_override",
    "from_dict",
    "load_config",
    "parse_override",
    "reference_yaml",
    "to_dict",
]
