"""Configuration: YAML + dotted overrides, typed, validated with one-line errors that name the field."""

import pytest
import yaml

from dense_rl.config import Config, ConfigError, load_config


def _write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_are_valid():
    config = load_config()
    assert isinstance(config, Config) and config.credit.mode == "coca"


def test_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, {"train": {"lr": 1e-3}, "credit": {"mode": "uniform"}})
    config = load_config(path, ["train.lr=2e-4", "sample.num_steps=10", "rewards=[{name: jpeg_compressibility}]"])
    assert config.train.lr == 2e-4 and config.credit.mode == "uniform" and config.sample.num_steps == 10
    assert [r.name for r in config.rewards] == ["jpeg_compressibility"] and config.rewards[0].weight == 1.0


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(overrides=["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"^sample.num_steps: expected an integer"):
        load_config(overrides=["sample.num_steps=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"^train.lrr: unknown key; valid keys are"),
        ("nope.x=1", r"^nope: unknown key"),
        ("train.lr=fast", r"^train.lr: expected a number, got 'fast'"),
        ("train.lr=-1", r"^train.lr: must be > 0"),
        ("credit.window_size=3", r"^credit.window_size: 3 does not divide sample.num_steps=20"),
        ("credit.mode=dense", r"^credit.mode: unknown mode 'dense'; choose one of coca, ode_gain, reward_gain, sparse, uniform"),
        ("sample.eta=0", r"^sample.eta: must be > 0"),
        ("cluster.max_policy_lag=2", r"^cluster.max_policy_lag: must be 0 \(sync, on-policy\) or 1"),
        ("sample.guidance_scale=0.5", r"^sample.guidance_scale: must be >= 1"),
        ("sample.batch_size=-4", r"^sample.batch_size: must be >= 1"),
        ("sample.prompts=/no/such/file.txt", r"^sample.prompts: file '/no/such/file.txt' does not exist"),
        ("train.batch_size=7", r"^train.batch_size: 7 does not divide the 32 samples per epoch"),
        ("rewards=[{name: hpsv3}]", r"^rewards\[0\].name: unknown reward 'hpsv3'"),
        ("model.dtype=float16", r"^model.dtype: float16 needs model.device=cuda"),
        ("credit.temporal_alpha=2", r"^credit.temporal_alpha: must be in \[0, 1\]"),
        ("sample.samples_per_prompt=3", r"^sample.samples_per_prompt: 3 must be >= 1 and divide"),
        ("train", r"^--set 'train': expected section.key=value"),
        ("model.pretrained.x=1", r"^model.pretrained: expected a string"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(overrides=[override])
    assert "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


def test_defaults_are_the_tiny_preset():
    """`python -m dense_rl.launch` with no --config runs exactly configs/tiny.yaml."""
    assert load_config("configs/tiny.yaml") == load_config()


@pytest.mark.parametrize("preset", ["configs/tiny.yaml", "configs/sd15-jpeg.yaml"])
def test_shipped_presets_are_valid(preset):
    load_config(preset)


def test_sd15_preset_uses_the_paper_settings():
    config = load_config("configs/sd15-jpeg.yaml")
    assert (config.sample.num_steps, config.sample.eta, config.sample.guidance_scale) == (50, 1.0, 5.0)
    assert (config.train.lr, config.train.clip_range, config.train.adv_clip_max) == (1e-4, 1e-4, 5.0)
    assert (config.credit.window_size, config.credit.temporal_alpha) == (5, 0.0)
    assert (config.credit.buffer_size, config.credit.min_count, config.samples_per_epoch) == (32, 16, 256)
