"""TRL 0.19.1's DDPOTrainer on the peer workload (../shared/peer/README.md) with a chosen reward and
learning rate, for `python -m dense_rl.bench time-to-reward`. The peer's own trl_ddpo_bench.py fixes
JPEG compressibility at lr 3e-4, which does not move in the epochs a sitting can afford; this runs the
same workload through TRL's public API with `brightness` (dense_rl's definition: the mean over pixels
of max(R, G, B)) or JPEG compressibility. Runs in the TRL venv, so it imports nothing of dense_rl.
Prints "epoch K: ..." after each epoch and one JSON line last, in the peer scripts' format.

usage: /tmp/trlvenv/bin/python trl_ddpo_run.py MODEL_DIR EPOCHS LR REWARD [CLIP_RANGE=1e-4]
"""

import io
import itertools
import json
import sys
import tempfile
import time

import torch
from PIL import Image
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().clamp(0, 1).amax(dim=1).mean(dim=(1, 2)).cpu()


def jpeg_compressibility(images: torch.Tensor) -> torch.Tensor:
    """Minus the size in kB of each image saved as JPEG quality 95 (DDPO's reward)."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes)


REWARDS = {"brightness": brightness, "jpeg_compressibility": jpeg_compressibility}


def main() -> None:
    model, epochs, lr, reward_name = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    clip_range = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-4
    torch.set_num_threads(2)
    prompts = itertools.cycle(line for line in open(f"{model}/prompts.txt").read().split("\n") if line)
    seen: list[torch.Tensor] = []

    def reward_fn(images, prompts_, metadata):
        values = REWARDS[reward_name](images)
        seen.append(values)
        return values, {}

    logdir = tempfile.mkdtemp(prefix="trl_ddpo_run_")
    config = DDPOConfig(
        num_epochs=epochs, seed=0, log_with=None, mixed_precision="no", logdir=logdir,
        project_kwargs={"project_dir": logdir}, save_freq=10**9,
        sample_num_steps=20, sample_eta=1.0, sample_guidance_scale=5.0, sample_batch_size=8,
        sample_num_batches_per_epoch=4, train_batch_size=8, train_gradient_accumulation_steps=1,
        train_timestep_fraction=1.0, per_prompt_stat_tracking=False, train_learning_rate=lr,
        train_clip_range=clip_range,
    )
    started = time.perf_counter()
    pipeline = DefaultDDPOStableDiffusionPipeline(model, use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, lambda: (next(prompts), {}), pipeline)
    setup = time.perf_counter() - started
    walls, means, step = [], [], 0
    for epoch in range(epochs):
        began = time.perf_counter()
        step = trainer.step(epoch, step)
        walls.append(time.perf_counter() - began)
        means.append(float(torch.cat(seen[-config.sample_num_batches_per_epoch:]).mean()))
        print(f"epoch {epoch}: {walls[-1]:.2f}s reward_mean={means[-1]:.4f}", flush=True)
    steady = walls[1:] or walls
    print(json.dumps({
        "impl": "trl.DDPOTrainer", "reward": reward_name, "lr": lr, "clip_range": clip_range,
        "setup_s": round(setup, 3),
        "samples_per_epoch": config.sample_batch_size * config.sample_num_batches_per_epoch, "epochs": epochs,
        "epoch_s": [round(w, 3) for w in walls], "reward_mean_per_epoch": [round(m, 5) for m in means],
        # the whole epoch: this runner does not split sampling from training
        "sample_s_per_epoch": 0.0, "reward_s_per_epoch": 0.0, "train_s_per_epoch": round(sum(steady) / len(steady), 3),
    }))


if __name__ == "__main__":
    main()
