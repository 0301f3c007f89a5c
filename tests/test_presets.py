"""Every shipped SD 1.5 preset loads, validates, and carries the paper's settings.

The CLIP-based rewards (aesthetic, hps, pickscore) are registered on another branch; until it is
merged, a preset naming an unregistered reward is skipped with that reason instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dense_rl.config import load_config
from dense_rl.prompts import load_prompts
from dense_rl.rewards import REWARD_NAMES

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SD15_PRESETS = {  # preset -> (reward name, PPO clip range in the paper)
    "sd15-aesthetic.yaml": ("aesthetic", 5e-5),
    "sd15-hps.yaml": ("hps", 1e-4),
    "sd15-pickscore.yaml": ("pickscore", 1e-4),
    "sd15-imagereward.yaml": ("imagereward", 1e-4),
    "sd15-jpeg.yaml": ("jpeg_compressibility", 1e-4),
}
# DDPO's simple_animals.txt (kvablack/ddpo-pytorch, ddpo_pytorch/assets/), in its order.
DDPO_SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
    "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig "
    "turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()


def test_every_sd15_preset_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("sd15-*.yaml")) == sorted(SD15_PRESETS)


@pytest.mark.parametrize("preset", sorted(SD15_PRESETS))
def test_sd15_preset_has_the_paper_settings(preset):
    reward, clip_range = SD15_PRESETS[preset]
    if reward not in REWARD_NAMES:
        pytest.skip(f"reward {reward!r} is not registered on this branch (the CLIP rewards land with issue5-clip)")
    config = load_config(CONFIGS / preset)
    assert [spec.name for spec in config.rewards] == [reward]
    assert config.model.pretrained == "runwayml/stable-diffusion-v1-5"
    assert (config.sample.num_steps, config.sample.eta, config.sample.guidance_scale) == (50, 1.0, 5.0)
    assert (config.train.lr, config.train.clip_range, config.train.adv_clip_max) == (1e-4, clip_range, 5.0)
    assert (config.credit.mode, config.credit.window_size, config.credit.temporal_alpha) == ("coca", 5, 0.0)
    assert (config.credit.buffer_size, config.credit.min_count, config.samples_per_epoch) == (32, 16, 256)
    assert config.lora.rank >= 1 and config.lora.target_modules
    # GPU placement: half-precision pipeline on CUDA rollout actors and learners; model rewards on a GPU.
    assert (config.model.device, config.model.dtype) == ("cuda", "float16")
    assert config.cluster.rollout_gpus > 0 and config.cluster.learner_gpus > 0
    weightless = reward.startswith("jpeg_")
    assert (config.cluster.reward_gpus > 0) == (not weightless)
    assert load_prompts(config.sample.prompts) == DDPO_SIMPLE_ANIMALS


def test_simple_animals_is_ddpos_list():
    assert load_prompts("embedded:simple_animals") == DDPO_SIMPLE_ANIMALS


def test_hpsv2_benchmark_json_loads_as_prompts(tmp_path):
    """HPSv2's benchmark ships as JSON lists of prompts (anime.json, photo.json, ...); a local copy
    is a prompt file as it is."""
    benchmark = tmp_path / "photo.json"
    benchmark.write_text('["A dog on a beach at sunset.", "  a red car  ", ""]', encoding="utf-8")
    assert load_prompts(str(benchmark)) == ["A dog on a beach at sunset.", "a red car"]
    config = load_config(CONFIGS / "sd15-jpeg.yaml", overrides=[f"sample.prompts={benchmark}"])
    assert load_prompts(config.sample.prompts)[0] == "A dog on a beach at sunset."
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompts": 3}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"sample.prompts: .*broken.json must hold a JSON list of strings"):
        load_prompts(str(broken))
