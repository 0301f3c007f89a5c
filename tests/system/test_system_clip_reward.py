"""End to end through real Ray on CPU: a tiny SD-shaped pipeline from disk, trained against CLIP-based
rewards (PickScore + LAION aesthetic on a tiny saved CLIP, loaded through `rewards[].path`)."""

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.diffusion.lora import read_lora_file
from dense_rl.run.storage import RunDir
from dense_rl.system.session import run_system
from support.tiny_models import build_tiny_sd, save_tiny_clip

pytestmark = pytest.mark.slow


def test_tiny_sd_trains_on_clip_rewards_through_ray(tmp_path):
    pipeline = build_tiny_sd(tmp_path / "sd")
    clip_folder = tmp_path / "clip"
    save_tiny_clip(clip_folder)
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
    for epoch in range(2):
        rows = run.read_table(f"samples/epoch-{epoch:04d}.parquet")
        assert len(rows) == 4 and {row["policy_version"] for row in rows} == {epoch}
        for row in rows:
            assert row["reward"] == pytest.approx(row["reward_pickscore"] + 0.5 * row["reward_aesthetic"], abs=1e-5)
        assert len({round(row["reward_pickscore"], 6) for row in rows}) > 1  # scored per image, not a constant
    # It trains: every epoch's update steps the optimizer and moves the LoRA. Its B weights start at
    # zero (peft's gaussian init), are off zero after the first update, and the second moves them again.
    assert all(m["learner_optimizer_steps"] >= 1 for m in history)
    latest = run.latest_checkpoint()
    session, newest = latest["path"].rsplit("/", 1)
    assert latest["epoch"] == 2 and newest == "epoch-0002"
    first, second = (read_lora_file(f"{run.uri}/{session}/epoch-{k:04d}") for k in (1, 2))
    assert any(value.abs().max() > 0 for key, value in first.items() if "lora_B" in key)
    assert first.keys() == second.keys() and any(not torch.equal(first[key], second[key]) for key in second)
