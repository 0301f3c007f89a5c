"""End to end through real Ray on CPU: a tiny SD-shaped pipeline from disk, trained against CLIP-based
rewards (PickScore + LAION aesthetic on a tiny saved CLIP, loaded through `rewards[].path`)."""

import math

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.run.storage import RunDir
from dense_rl.system.session import run_system
from support.tiny_models import build_tiny_sd, save_tiny_clip

pytestmark = pytest.mark.slow


def test_tiny_sd_trains_on_clip_rewards_through_ray(tmp_path):
    pipeline = build_tiny_sd(tmp_path / "sd")
    clip_folder = tmp_path / "clip"
    clip = save_tiny_clip(clip_folder)
    torch.manual_seed(0)
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in ** 0.5
        head[f"layers.{index}.bias"] = torch.zeros(fan_out)
    torch.save(head, clip_folder / "aesthetic-model.pth")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red bird\na horse\n")

    config = load_config("configs/tiny.yaml", [
        f"model.pretrained={pipeline}", f"sample.prompts={prompts}",
        f"rewards=[{{name: pickscore, weight: 1.0, path: {clip_folder}}}, "
        f"{{name: aesthetic, weight: 0.5, path: {clip_folder}}}]",
        "sample.num_steps=5", "credit.window_size=5", "sample.batch_size=4", "sample.num_batches_per_epoch=1",
        "sample.samples_per_prompt=2", "train.batch_size=4", "run.num_epochs=2", "run.name=clip",
        f"run.output_dir={tmp_path}", "cluster.address=local", "cluster.num_rollout_workers=1",
        "cluster.num_reward_workers=1", "cluster.num_learner_workers=1",
    ])
    history = run_system(config, f"{tmp_path}/clip", show_progress=False)

    assert [m["epoch"] for m in history] == [0, 1]
    run = RunDir(f"{tmp_path}/clip")
    bound = math.exp(clip.logit_scale.item())  # PickScore = exp(logit_scale) * cosine
    for epoch in range(2):
        rows = run.read_table(f"samples/epoch-{epoch:04d}.parquet")
        assert len(rows) == 4 and {row["policy_version"] for row in rows} == {epoch}
        for row in rows:
            assert abs(row["reward_pickscore"]) <= bound
            assert row["reward"] == pytest.approx(row["reward_pickscore"] + 0.5 * row["reward_aesthetic"], abs=1e-5)
        assert len({round(row["reward_pickscore"], 6) for row in rows}) > 1  # scored per image, not a constant
    assert run.latest_checkpoint()["epoch"] == 2
    assert all(math.isfinite(m["reward_mean"]) for m in history)
