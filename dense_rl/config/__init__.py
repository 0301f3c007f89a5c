"""What a user gives a run, and how it can be wrong.

- `schema`: the one typed configuration (dataclasses), loaded from YAML with dotted overrides and
  validated in one place (`load_config`, `validate`).
- `preflight`: checks of what the configuration names, reading files but loading no weights: the
  model on disk, LoRA target modules and files, the memory an epoch needs.
- `layout`: how many actors of each role, with how many CPUs and threads, when the config leaves it open.
- `errors`: `ConfigError` (bad input) and `RunFailed` (a run that cannot go on), each one line.
"""

from dense_rl.config.errors import ConfigError, RunFailed
from dense_rl.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    Config,
    CreditConfig,
    EvaluationConfig,
    GuardConfig,
    LoraConfig,
    ModelConfig,
    RewardSpec,
    RunConfig,
    SampleConfig,
    TrainConfig,
    load_config,
    validate,
)

__all__ = ["CheckpointConfig", "ClusterConfig", "Config", "ConfigError", "CreditConfig", "EvaluationConfig", "GuardConfig", "LoraConfig", "ModelConfig", "RewardSpec",
           "RunConfig", "RunFailed", "SampleConfig", "TrainConfig", "load_config", "validate"]
