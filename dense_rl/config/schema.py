"""The one typed configuration: dataclasses, loaded from YAML with dotted overrides, validated in one place.

The defaults are the embedded tiny preset (configs/tiny.yaml); SD 1.5 presets live in configs/.

    config = load_config("configs/tiny.yaml", overrides=["train.lr=3e-4", "credit.mode=uniform"])

Every error is a `ConfigError` whose message is one line naming the field and the fix; `launch`
prints it and exits before any model is loaded or any Ray process starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dense_rl.config.errors import ConfigError


@dataclass
class ModelConfig:
    pretrained: str = "embedded:tiny"  # "embedded:tiny", a hub id, or a local diffusers folder
    revision: str | None = None
    dtype: str = "float32"  # float32 | float16 | bfloat16 (half precision needs a GPU)
    device: str = "cpu"  # cpu | cuda
    compile: bool = False  # torch.compile the UNet / flow transformer for sampling and training (opt-in)


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init_from: str | None = None  # a LoRA .safetensors (diffusers format) to start from


@dataclass
class SampleConfig:
    prompts: str = "embedded:tiny_train"  # "embedded:NAME" or a text file, one prompt per line
    negative_prompt: str = ""
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 4.0
    batch_size: int = 16  # trajectories per rollout call
    num_batches_per_epoch: int = 2
    samples_per_prompt: int = 4  # each drawn prompt is sampled this many times per batch
    # sde_noise_level: the flow SDE's noise (Flow-GRPO's default; flow models only, as eta is DDIM's).
    # sde_window: [start, stop) of the steps sampled stochastically and trained, deterministic (ODE)
    # steps elsewhere (the MixGRPO / Flow-GRPO-Fast speed-up; DDIM takes eta-0 steps there). Empty: every step.
    sde_noise_level: float = 0.7
    sde_window: list[int] = field(default_factory=list)
    resolution: int | None = None  # image height = width in pixels; None: the model's own size


@dataclass
class RewardSpec:
    name: str = "preference"
    weight: float = 1.0
    path: str | None = None  # local weights or hub id, for rewards that load a model
    dtype: str = "auto"  # auto (float16 when cluster.reward_gpus > 0, else float32) | float32 | float16 | bfloat16


@dataclass
class CreditConfig:
    mode: str = "coca"  # coca | uniform (UCA) | sparse (DDPO) | reward_gain (scores each window boundary)
    window_size: int = 5
    temporal_alpha: float = 0.0
    buffer_size: int = 32  # trajectories kept per prompt by both normalisation stages
    min_count: int = 4
    # per_prompt: normalise by each prompt's recent rewards (DDPO's tracker, buffer_size/min_count);
    # group: within each prompt's samples of this epoch (GRPO), dividing by their std if group_std.
    advantages: str = "per_prompt"
    group_std: bool = True


@dataclass
class TrainConfig:
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    batch_size: int = 8  # trajectories per optimizer step
    num_inner_epochs: int = 1
    clip_range: float = 1e-3  # the paper uses 1e-4 on SD 1.5 (configs/sd15-*.yaml)
    adv_clip_max: float = 5.0
    max_grad_norm: float = 1.0
    timestep_fraction: float = 1.0  # each trajectory trains a random subset of this share of its trained steps
    # [start, stop) of the steps trained, within sample.sde_window; empty: every stochastic step. Flow-GRPO
    # samples all 10 steps with the SDE and trains the first 9 ([0, 9]).
    step_window: list[int] = field(default_factory=list)
    kl_beta: float = 0.0  # KL to the reference policy (LoRA disabled); 0 = off
    # exact: the Gaussian KL of each step, (mean - mean_ref)^2 / (2 std^2); flow_grpo: Flow-GRPO's form for
    # flow models, divided by the SDE's std_dev_t^2 instead of the step's variance std_dev_t^2 * |dt|
    # (docs/algorithm.md, "The KL to the reference").
    kl_form: str = "exact"


@dataclass
class EvaluationConfig:
    """Held-out evaluation during training (every `every_epochs` epochs, and the base model once) and the
    sampling of every evaluation, `python -m dense_rl.evaluate` too: fixed prompts, fixed noise."""

    every_epochs: int = 0  # 0: no held-out evaluation during training
    prompts: str = "embedded:tiny_heldout"  # "embedded:NAME" or a text file of held-out prompts
    max_prompts: int | None = None  # the first N of them; None: all
    samples_per_prompt: int = 1
    # Scored besides the trained rewards: NAME, or NAME=PATH for one that loads weights (as `evaluate --rewards`).
    rewards: list[str] = field(default_factory=list)
    batch_size: int = 16  # images per rollout call
    seed: int = 1234  # batch b of the held-out set is sampled with noise seed + b, for every policy
    num_steps: int | None = None  # None: sample.num_steps
    guidance_scale: float | None = None  # None: sample.guidance_scale
    # auto: deterministic (ODE) steps for flow models, as Flow-GRPO evaluates, and the training sampler
    # (DDIM at sample.eta) for DDIM models; sde: the training sampler; ode: deterministic steps.
    sampler: str = "auto"


@dataclass
class GuardConfig:
    """A rule on a held-out reward (a trained one, one of evaluation.rewards, or `trained`: the weighted
    sum of the trained rewards) or an image monitor (image_brightness, image_saturation, image_contrast,
    image_diversity), checked at every held-out evaluation. One of max_drop (below the base model's
    score), min or max."""

    metric: str = ""
    max_drop: float | None = None
    min: float | None = None
    max: float | None = None
    action: str = "warn"  # warn: log it; stop: end the run after this epoch, naming the guard


@dataclass
class RunConfig:
    name: str = ""  # empty: "run-<date>-<time>"; an existing name must be resumed, not reused
    output_dir: str = "runs"
    num_epochs: int = 12
    seed: int = 0
    save_every: int = 1


@dataclass
class CheckpointConfig:
    # Checkpoint folders of a session kept in the run directory (Ray Train's CheckpointConfig.num_to_keep):
    # the newest ones, which always include the one latest.json names. At least 2: the newest is written
    # before the driver completes it, and until then latest.json names the one before.
    keep: int = 3


@dataclass
class ClusterConfig:
    address: str | None = None  # a Ray address; None joins a running cluster if any, else starts one; "local" always starts one
    # Worker counts and CPUs left empty (null) are chosen from the CPUs the Ray cluster reports
    # (dense_rl/config/layout.py); set any of them to place the roles yourself.
    num_rollout_workers: int | None = None
    num_reward_workers: int = 1
    num_learner_workers: int | None = None  # learner ranks (DDP)
    rollout_cpus: float | None = None  # per actor; torch uses this many threads unless rollout_threads says otherwise
    rollout_gpus: float = 0.0  # per actor; > 0 places the pipeline on CUDA
    reward_cpus: float | None = None
    reward_gpus: float = 0.0
    learner_cpus: float | None = None
    learner_gpus: float = 0.0  # per worker; > 0 trains on CUDA with NCCL
    # torch threads per actor; null: the CPUs it asks for (at least 1). A layout whose roles take turns
    # on the same cores (sync mode) asks Ray for a share of a core and uses more threads than that.
    rollout_threads: int | None = None
    reward_threads: int | None = None
    learner_threads: int | None = None
    max_policy_lag: int = 0  # 0: sync, exactly on-policy; 1: async, rollouts overlap the update (decoupled PPO)
    # Fault tolerance (docs/reliability.md): restarts of a dead rollout/reward actor, retries of a
    # failed reward call before the run stops, and learner-group restarts.
    actor_restarts: int = 3
    reward_retries: int = 2
    learner_failures: int = 2
    resource_wait_s: float = 60.0  # how long to wait for an autoscaler to add the CPUs/GPUs asked for
    # A custom Ray resource per role, e.g. "rollout" on nodes started with --resources='{"rollout": 4}':
    # each actor (or learner worker) of the role asks for one unit of it, so roles land on the nodes
    # that advertise it. Empty: no custom resource, place anywhere.
    rollout_resource: str = ""
    reward_resource: str = ""
    learner_resource: str = ""
    # How Ray Train places the learner workers' bundles: PACK (as few nodes as possible), SPREAD,
    # STRICT_PACK (one node) or STRICT_SPREAD (one node each).
    learner_placement: str = "PACK"

    @property
    def is_placed(self) -> bool:
        """Every count and CPU share set (by the user or by dense_rl.config.layout.fit_layout)."""
        return None not in (self.num_rollout_workers, self.num_learner_workers, self.rollout_cpus,
                            self.reward_cpus, self.learner_cpus)

    def threads(self, role: str) -> int:
        """torch threads for one actor of `role` (rollout, reward, learner)."""
        threads = getattr(self, f"{role}_threads")
        return threads if threads is not None else max(1, int(getattr(self, f"{role}_cpus") or 1))

    def custom_resources(self, role: str) -> dict[str, float]:
        """{"<cluster.ROLE_resource>": 1} or {} for role in rollout, reward, learner."""
        name = getattr(self, f"{role}_resource")
        return {name: 1.0} if name else {}

    def resources_needed(self) -> dict[str, float]:
        """What the actors and learners ask Ray for; only for a placed layout (is_placed)."""
        needed = {
            "CPU": self.num_rollout_workers * self.rollout_cpus + self.num_reward_workers * self.reward_cpus
            + self.num_learner_workers * self.learner_cpus,
            "GPU": self.num_rollout_workers * self.rollout_gpus + self.num_reward_workers * self.reward_gpus
            + self.num_learner_workers * self.learner_gpus,
        }
        for role, count in (("rollout", self.num_rollout_workers), ("reward", self.num_reward_workers),
                            ("learner", self.num_learner_workers)):
            for name, amount in self.custom_resources(role).items():
                needed[name] = needed.get(name, 0.0) + count * amount
        return needed


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    credit: CreditConfig = field(default_factory=CreditConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    guards: list[GuardConfig] = field(default_factory=list)

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated before returning."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist; pass a YAML file such as configs/tiny.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise ConfigError(f"--config: {path} is not valid YAML ({first_line}); fix the file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections (model:, sample:, ...)")
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, "")
    validate(config)
    return config


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. --set train.lr=3e-4")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid keys are {', '.join(sorted(names))}")
    values = {}
    for name in raw:
        values[name] = _convert(raw[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**values)


def _convert(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, options[0], where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {where}")  # a bug in this module, not user input


# --------------------------------------------------------------------------- validation


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


IMAGE_MONITORS = ("image_brightness", "image_saturation", "image_contrast", "image_diversity")


def _validate_heldout(config: Config) -> None:
    """The held-out evaluation and the guards on it."""
    from dense_rl.rewards import REWARD_NAMES

    evaluation, run = config.evaluation, config.run
    _require(evaluation.every_epochs >= 0, "evaluation.every_epochs", f"must be >= 0 (0: off), got {evaluation.every_epochs}")
    _require(evaluation.every_epochs <= run.num_epochs, "evaluation.every_epochs",
             f"{evaluation.every_epochs} is longer than the run (run.num_epochs={run.num_epochs}); evaluate at least once")
    _require(evaluation.samples_per_prompt >= 1, "evaluation.samples_per_prompt",
             f"must be >= 1, got {evaluation.samples_per_prompt}")
    _require(evaluation.max_prompts is None or evaluation.max_prompts >= 1, "evaluation.max_prompts",
             f"must be >= 1, or null for all, got {evaluation.max_prompts}")
    _require(evaluation.batch_size >= 1, "evaluation.batch_size", f"must be >= 1, got {evaluation.batch_size}")
    _require(not evaluation.every_epochs or evaluation.prompts.startswith("embedded:") or Path(evaluation.prompts).is_file(),
             "evaluation.prompts", f"file {evaluation.prompts!r} does not exist; give a text file of held-out prompts "
             "or embedded:tiny_heldout")
    extra = [text.partition("=")[0] for text in evaluation.rewards]
    for i, name in enumerate(extra):
        _require(name in REWARD_NAMES, f"evaluation.rewards[{i}]",
                 f"unknown reward {name!r}; choose one of {', '.join(sorted(REWARD_NAMES))}")
    _require(len(set(extra)) == len(extra), "evaluation.rewards", f"a reward is listed twice in {extra}; list each once")
    metrics = {spec.name for spec in config.rewards} | set(extra) | {"trained"} | set(IMAGE_MONITORS)
    for i, guard in enumerate(config.guards):
        where = f"guards[{i}]"
        _require(guard.metric in metrics, f"{where}.metric",
                 f"unknown metric {guard.metric!r}; guard a trained reward, one of evaluation.rewards, trained or "
                 f"an image monitor: {', '.join(sorted(metrics))}")
        rules = [name for name in ("max_drop", "min", "max") if getattr(guard, name) is not None]
        _require(len(rules) == 1, where, f"give exactly one of max_drop, min or max, got {rules or 'none'}")
        _require(guard.max_drop is None or guard.max_drop >= 0, f"{where}.max_drop",
                 f"must be >= 0 (how far the metric may fall below the base model's), got {guard.max_drop}")
        _require(guard.action in ("warn", "stop"), f"{where}.action", f"{guard.action!r} is not warn or stop")
        _require(evaluation.every_epochs >= 1, "evaluation.every_epochs",
                 f"guards[{i}] is checked at held-out evaluations; set evaluation.every_epochs >= 1")
        _require(guard.metric != "image_diversity" or evaluation.samples_per_prompt >= 2,
                 "evaluation.samples_per_prompt", f"guards[{i}] watches image_diversity, which compares the samples "
                 "of each prompt: set it >= 2")


def validate(config: Config) -> None:
    """Every cross-field rule lives here, so a bad config fails before anything expensive starts."""
    from dense_rl.algo.advantages import ADVANTAGE_MODES
    from dense_rl.algo.credit import credit_mode, credit_mode_names
    from dense_rl.rewards import FLOAT32_ONLY, REWARD_NAMES

    model, sample, credit, train, run, lora = (
        config.model, config.sample, config.credit, config.train, config.run, config.lora
    )
    _require(model.dtype in ("float32", "float16", "bfloat16"), "model.dtype", f"{model.dtype!r} is not float32, float16 or bfloat16")
    _require(model.device in ("cpu", "cuda"), "model.device", f"{model.device!r} is not cpu or cuda")
    _require(model.dtype == "float32" or model.device == "cuda", "model.dtype",
             f"{model.dtype} needs model.device=cuda; use float32 on CPU")

    _require(lora.rank >= 1, "lora.rank", f"must be >= 1, got {lora.rank}")
    _require(lora.alpha > 0, "lora.alpha", f"must be > 0, got {lora.alpha}")
    _require(len(lora.target_modules) > 0, "lora.target_modules", "must name at least one module, e.g. [to_q, to_v]")

    _require(sample.num_steps >= 1, "sample.num_steps", f"must be >= 1, got {sample.num_steps}")
    _require(sample.eta > 0, "sample.eta", f"must be > 0 for step log-probs (got {sample.eta}); the paper uses 1.0")
    _require(sample.guidance_scale >= 1.0, "sample.guidance_scale",
             f"must be >= 1 (1 disables classifier-free guidance), got {sample.guidance_scale}")
    _require(sample.batch_size >= 1, "sample.batch_size", f"must be >= 1, got {sample.batch_size}")
    _require(sample.num_batches_per_epoch >= 1, "sample.num_batches_per_epoch",
             f"must be >= 1, got {sample.num_batches_per_epoch}")
    _require(sample.samples_per_prompt >= 1 and sample.batch_size % sample.samples_per_prompt == 0,
             "sample.samples_per_prompt",
             f"{sample.samples_per_prompt} must be >= 1 and divide sample.batch_size={sample.batch_size}")
    _require(sample.resolution is None or sample.resolution >= 8, "sample.resolution",
             f"must be >= 8 pixels, or null for the model's own size, got {sample.resolution}")
    _require(sample.sde_noise_level > 0, "sample.sde_noise_level",
             f"must be > 0 for step log-probs (got {sample.sde_noise_level}); Flow-GRPO uses 0.7")
    window = sample.sde_window
    _require(window == [] or (len(window) == 2 and 0 <= window[0] < window[1] <= sample.num_steps), "sample.sde_window",
             f"{window} must be [] (every step) or [start, stop] with 0 <= start < stop <= sample.num_steps={sample.num_steps}")
    _require(sample.prompts.startswith("embedded:") or Path(sample.prompts).is_file(), "sample.prompts",
             f"file {sample.prompts!r} does not exist; give a text file with one prompt per line or embedded:tiny_train")

    _require(len(config.rewards) >= 1, "rewards", "configure at least one reward, e.g. [{name: preference}]")
    for i, spec in enumerate(config.rewards):
        _require(spec.name in REWARD_NAMES, f"rewards[{i}].name",
                 f"unknown reward {spec.name!r}; choose one of {', '.join(sorted(REWARD_NAMES))}")
        local_path = spec.path is not None and (spec.path.startswith(("/", ".", "~")) or spec.path.count("/") > 1)
        _require(not local_path or Path(spec.path).expanduser().exists(), f"rewards[{i}].path",
                 f"{spec.path!r} does not exist; give an existing local file or folder, or a hub id such as xswu/HPSv2")
        _require(spec.dtype in ("auto", "float32", "float16", "bfloat16"), f"rewards[{i}].dtype",
                 f"{spec.dtype!r} is not auto, float32, float16 or bfloat16")
        _require(spec.dtype in ("auto", "float32") or config.cluster.reward_gpus > 0, f"rewards[{i}].dtype",
                 f"{spec.dtype} needs a GPU; set cluster.reward_gpus > 0 or use auto/float32 on CPU")
        _require(spec.dtype == "auto" or spec.name not in FLOAT32_ONLY, f"rewards[{i}].dtype",
                 f"{spec.name} always runs in float32; remove dtype (or set it to auto)")
    names = [spec.name for spec in config.rewards]
    _require(len(set(names)) == len(names), "rewards", f"a reward is listed twice in {names}; list each once")
    _require(any(spec.weight != 0 for spec in config.rewards), "rewards", "every reward weight is 0")

    modes = credit_mode_names()
    _require(credit.mode in modes, "credit.mode", f"unknown mode {credit.mode!r}; choose one of {', '.join(modes)}")
    _require(credit.advantages in ADVANTAGE_MODES, "credit.advantages",
             f"unknown {credit.advantages!r}; choose one of {', '.join(ADVANTAGE_MODES)}")
    _require(credit.advantages != "group" or sample.samples_per_prompt >= 2, "sample.samples_per_prompt",
             f"group advantages compare each prompt's samples, so it must be >= 2 (got {sample.samples_per_prompt})")
    _require(credit.window_size >= 1, "credit.window_size", f"must be >= 1, got {credit.window_size}")
    _require(not credit_mode(credit.mode).windowed or sample.num_steps % credit.window_size == 0, "credit.window_size",
             f"{credit.window_size} does not divide sample.num_steps={sample.num_steps}; pick a divisor")
    _require(0.0 <= credit.temporal_alpha <= 1.0, "credit.temporal_alpha", f"must be in [0, 1], got {credit.temporal_alpha}")
    _require(credit.buffer_size >= 1, "credit.buffer_size", f"must be >= 1, got {credit.buffer_size}")
    _require(0 <= credit.min_count <= credit.buffer_size, "credit.min_count",
             f"must be between 0 and credit.buffer_size={credit.buffer_size}, got {credit.min_count}")

    _require(train.lr > 0, "train.lr", f"must be > 0, got {train.lr}")
    _require(train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {train.batch_size}")
    _require(config.samples_per_epoch % train.batch_size == 0, "train.batch_size",
             f"{train.batch_size} does not divide the {config.samples_per_epoch} samples per epoch "
             "(sample.batch_size x sample.num_batches_per_epoch)")
    _require(train.num_inner_epochs >= 1, "train.num_inner_epochs", f"must be >= 1, got {train.num_inner_epochs}")
    _require(train.clip_range > 0, "train.clip_range", f"must be > 0, got {train.clip_range}")
    _require(train.adv_clip_max > 0, "train.adv_clip_max", f"must be > 0, got {train.adv_clip_max}")
    _require(train.max_grad_norm > 0, "train.max_grad_norm", f"must be > 0, got {train.max_grad_norm}")
    _require(0 < train.timestep_fraction <= 1, "train.timestep_fraction", f"must be in (0, 1], got {train.timestep_fraction}")
    _require(train.kl_beta >= 0, "train.kl_beta", f"must be >= 0, got {train.kl_beta}")
    _require(train.kl_form in ("exact", "flow_grpo"), "train.kl_form", f"{train.kl_form!r} is not exact or flow_grpo")
    stochastic = range(*window) if window else range(sample.num_steps)
    steps = train.step_window
    _require(steps == [] or (len(steps) == 2 and 0 <= steps[0] < steps[1] <= sample.num_steps), "train.step_window",
             f"{steps} must be [] (every stochastic step) or [start, stop] with 0 <= start < stop <= sample.num_steps="
             f"{sample.num_steps}")
    _require(steps == [] or len(range(max(steps[0], stochastic.start), min(steps[1], stochastic.stop))) > 0,
             "train.step_window", f"{steps} trains none of the stochastic steps sample.sde_window={window}; overlap them")

    evaluation = config.evaluation
    _require(evaluation.num_steps is None or evaluation.num_steps >= 1, "evaluation.num_steps",
             f"must be >= 1, or null for sample.num_steps, got {evaluation.num_steps}")
    _require(evaluation.guidance_scale is None or evaluation.guidance_scale >= 1.0, "evaluation.guidance_scale",
             f"must be >= 1, or null for sample.guidance_scale, got {evaluation.guidance_scale}")
    _require(evaluation.sampler in ("auto", "sde", "ode"), "evaluation.sampler",
             f"{evaluation.sampler!r} is not auto, sde or ode")
    _validate_heldout(config)

    cluster = config.cluster
    for name in ("num_rollout_workers", "num_reward_workers", "num_learner_workers",
                 "rollout_threads", "reward_threads", "learner_threads"):
        value = getattr(cluster, name)
        _require(value is None or value >= 1, f"cluster.{name}", f"must be >= 1 (or null: chosen from the cluster), got {value}")
    for name in ("rollout_cpus", "reward_cpus", "learner_cpus", "rollout_gpus", "reward_gpus", "learner_gpus"):
        value = getattr(cluster, name)
        _require(value is None or value >= 0, f"cluster.{name}", f"must be >= 0, got {value}")
    learners = cluster.num_learner_workers
    _require(learners is None or train.batch_size % learners == 0, "train.batch_size",
             f"{train.batch_size} is not divisible by cluster.num_learner_workers={learners}; "
             "each learner takes an equal share of every optimizer step")
    for name in ("actor_restarts", "reward_retries", "learner_failures"):
        _require(getattr(cluster, name) >= 0, f"cluster.{name}", f"must be >= 0, got {getattr(cluster, name)}")
    _require(cluster.resource_wait_s >= 0, "cluster.resource_wait_s", f"must be >= 0, got {cluster.resource_wait_s}")
    # The driver samples at most one epoch ahead of the learner, so a lag of 2 could never happen.
    _require(cluster.max_policy_lag in (0, 1), "cluster.max_policy_lag",
             f"must be 0 (sync, on-policy) or 1 (async: sample the next epoch during the update), got {cluster.max_policy_lag}")
    for role in ("rollout", "reward", "learner"):
        name = getattr(cluster, f"{role}_resource")
        _require(name == "" or (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) is not None
                                and name not in ("CPU", "GPU", "memory", "object_store_memory")),
                 f"cluster.{role}_resource", f"{name!r} must be a custom Ray resource name such as {role!r} "
                 "(letters, digits, _ . -; not CPU/GPU/memory), or empty")
    placements = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    _require(cluster.learner_placement in placements, "cluster.learner_placement",
             f"{cluster.learner_placement!r} is not one of {', '.join(placements)}")
    on_gpus = cluster.rollout_gpus > 0 and cluster.learner_gpus > 0
    _require(model.device == "cpu" or on_gpus, "model.device",
             "cuda needs cluster.rollout_gpus > 0 and cluster.learner_gpus > 0 so the actors are placed on GPUs")
    _require(model.device == "cuda" or (cluster.rollout_gpus == 0 and cluster.learner_gpus == 0), "model.device",
             "cpu, but cluster.rollout_gpus/learner_gpus ask for GPUs; set model.device=cuda or the GPUs to 0")

    _require(run.num_epochs >= 1, "run.num_epochs", f"must be >= 1, got {run.num_epochs}")
    _require(run.save_every >= 1, "run.save_every", f"must be >= 1, got {run.save_every}")
    _require(config.checkpoint.keep >= 2, "checkpoint.keep", f"must be >= 2 (the newest checkpoint and the one "
             f"latest.json names until the newest is complete), got {config.checkpoint.keep}")
    _require("/" not in run.name, "run.name", f"{run.name!r} must be a name, not a path; use run.output_dir for the folder")
