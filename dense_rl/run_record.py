"""What a run writes each epoch (metrics, samples, image grid, reward curve, driver state) and how a
run is resumed from its newest complete checkpoint."""

from __future__ import annotations

import yaml

from dense_rl.config import Config
from dense_rl.lora import LORA_FILE, lora_state_from_diffusers
from dense_rl.plots import image_grid_png, reward_curve_png
from dense_rl.run_dir import CONFIG_FILE, RunDir
from dense_rl.stats import PerPromptStatTracker

DRIVER_STATE = "driver_state.json"


class RunRecorder:
    def __init__(self, run: RunDir, config: Config):
        self.run = run
        self.config = config

    # ------------------------------------------------------------------ per epoch

    def epoch_metrics(self, epoch, state, scored, advantage_info, learner_metrics, timings) -> dict:
        import torch

        every = torch.cat([b.scores.rewards for b in scored])
        rewards = every[torch.isfinite(every)]  # NaN/inf ones were dropped from the update (bad_rewards)
        advantage_info = dict(advantage_info)
        bad_rewards = int(advantage_info.pop("bad_rewards", 0))
        epoch_seconds = sum(timings.values())
        metrics = {
            "epoch": epoch,
            "policy_version": epoch + 1,
            "samples_seen": state.samples_seen,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "reward_min": float(rewards.min()),
            "reward_max": float(rewards.max()),
            "bad_rewards": bad_rewards,
            "credit_fallbacks": sum(b.scores.num_fallbacks for b in scored),
            "epoch_seconds": epoch_seconds,
            "samples_per_second": len(every) / max(epoch_seconds, 1e-9),
            **{f"seconds_{k}": v for k, v in timings.items()},
            **{f"adv_{k}" if not k.startswith("adv") else k: float(v) for k, v in advantage_info.items()},
            **{f"learner_{k}": float(v) for k, v in learner_metrics.items()},
        }
        for name in scored[0].scores.components:
            values = torch.cat([b.scores.components[name] for b in scored])
            metrics[f"reward_{name}"] = float(values[torch.isfinite(values)].mean())
        return metrics

    @staticmethod
    def epoch_line(metrics: dict) -> str:
        return (
            f"epoch {metrics['epoch']:4d}  samples {metrics['samples_seen']:6d}  reward {metrics['reward_mean']:+.4f} "
            f"± {metrics['reward_std']:.4f}  kl {metrics.get('learner_approx_kl', 0.0):.2e}  "
            f"clipfrac {metrics.get('learner_clipfrac', 0.0):.3f}  {metrics['samples_per_second']:.2f} samples/s"
            + (f"  bad_rewards {metrics['bad_rewards']}" if metrics.get("bad_rewards") else "")
        )

    def record_epoch(self, epoch: int, state, scored, metrics: dict, checkpoint: str | None) -> None:
        import torch

        run = self.run
        rows = []
        for batch in scored:
            for i, prompt in enumerate(batch.prompts):
                rows.append({
                    "epoch": epoch,
                    "prompt": prompt,
                    "reward": float(batch.scores.rewards[i]),
                    **{f"reward_{k}": float(v[i]) for k, v in batch.scores.components.items()},
                    "step_credits": None if batch.scores.step_weights is None else batch.scores.step_weights[i].tolist(),
                    "policy_version": batch.policy_version,
                })
        run.write_table(f"samples/epoch-{epoch:04d}.parquet", rows)
        preview = torch.cat([b.preview for b in scored])[:32]
        run.write_bytes(f"images/epoch-{epoch:04d}.png", image_grid_png(preview))
        run.write_table("metrics.parquet", state.history)
        history = state.history
        run.write_bytes("reward_curve.png", reward_curve_png(
            [m["samples_seen"] for m in history], [m["reward_mean"] for m in history],
            [m["reward_std"] for m in history], title=f"{self.config.run.name}: {self.config.credit.mode}",
        ))
        if checkpoint is not None:
            # The learner has written LoRA + optimizer into this checkpoint; the driver state goes
            # in last, then latest.json names it, so a crash in between leaves the previous one current.
            run.write_json(f"{checkpoint}/{DRIVER_STATE}", driver_state_dict(state))
            run.mark_latest(state.epoch, checkpoint)

    def write_config(self) -> None:
        self.run.write_bytes(CONFIG_FILE, yaml.safe_dump(self.config.to_dict(), sort_keys=False).encode())


# ---------------------------------------------------------------------- driver state


def driver_state_dict(state) -> dict:
    return {
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "reward_tracker": state.reward_tracker.state_dict(),
        "step_tracker": state.step_tracker.state_dict(),
        "history": state.history,
    }


def new_driver_state(config: Config):
    from dense_rl.driver import DriverState

    credit = config.credit
    return DriverState(
        reward_tracker=PerPromptStatTracker(credit.buffer_size, credit.min_count),
        step_tracker=PerPromptStatTracker(credit.buffer_size, credit.min_count),
    )


def load_resume_point(run: RunDir, config: Config):
    """(driver state, LoRA state, checkpoint path) of the newest complete checkpoint, or a fresh state
    and None when the run has none yet."""
    state = new_driver_state(config)
    latest = run.latest_checkpoint()
    if latest is None:
        return state, None, None
    saved = run.read_json(f"{latest['path']}/{DRIVER_STATE}")
    state.epoch = saved["epoch"]
    state.samples_seen = saved["samples_seen"]
    state.reward_tracker.load_state_dict(saved["reward_tracker"])
    state.step_tracker.load_state_dict(saved["step_tracker"])
    state.history = saved["history"]
    lora = read_lora_bytes(run, f"{latest['path']}/{LORA_FILE}")
    return state, lora, latest["path"]


def read_lora_bytes(run: RunDir, relative: str) -> dict:
    """read_lora_file for any filesystem: diffusers-named tensors -> peft-named adapter state."""
    return lora_state_from_diffusers(run.read_tensors(relative), source=f"{run.uri}/{relative}")
