"""The run configuration: a typed dataclass tree (`schema`), read from YAML with `a.b=value`
overrides (`load`), each section range-checked (`checks`). It imports no other lmdistill
package; `lmdistill.validate.load_config` adds the checks of registered names, and commands
load through it. The user's config is never mutated: derived values live in the code that
needs them."""

from lmdistill.config.checks import check_sections
from lmdistill.config.load import (
    build_config,
    changed_settings,
    config_hash,
    read_config,
    save_config,
    to_dict,
)
from lmdistill.config.schema import (
    CacheConfig,
    CondenseConfig,
    ConfigError,
    DataConfig,
    EnsembleConfig,
    EvalConfig,
    GenerateConfig,
    IncrementalConfig,
    LossConfig,
    MemoryConfig,
    ModelConfig,
    ObjectiveConfig,
    OnPolicyConfig,
    ProtocolConfig,
    RunConfig,
    SelectConfig,
    StudentConfig,
    StudentLoraConfig,
    SynthesiseConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "CacheConfig",
    "CondenseConfig",
    "ConfigError",
    "DataConfig",
    "EnsembleConfig",
    "EvalConfig",
    "GenerateConfig",
    "IncrementalConfig",
    "LossConfig",
    "MemoryConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OnPolicyConfig",
    "ProtocolConfig",
    "RunConfig",
    "SelectConfig",
    "StudentConfig",
    "StudentLoraConfig",
    "SynthesiseConfig",
    "TeacherConfig",
    "TrainConfig",
    "build_config",
    "changed_settings",
    "check_sections",
    "config_hash",
    "read_config",
    "save_config",
    "to_dict",
]
