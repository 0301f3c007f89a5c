"""What a run writes each epoch (metrics, samples, image grid, reward curve) and each session (its
config, newest and history). Checkpoints, and resuming from one, are dense_rl/run/checkpoints.py's."""

from __future__ import annotations

import yaml

from dense_rl.config import Config
from dense_rl.run.checkpoints import complete_checkpoint
from dense_rl.run.plots import image_grid_png, reward_curve_png
from dense_rl.run.storage import CONFIG_FILE, CONFIG_HISTORY, RunDir


def epoch_metrics(epoch: int, state, scored, advantage_info: dict, learner_metrics: dict, timings: dict) -> dict:
    """The row of metrics.parquet for one epoch: rewards of its scored batches (`ScoredBatch`), their
    credit and advantage statistics, the learner's metrics (`learner_*`) and the stage timings (`seconds_*`)."""
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
    if any(b.scores.boundary_seconds for b in scored):  # what the credit mode's boundary images cost
        metrics["credit_model_calls_per_sample"] = float(scored[0].scores.boundary_model_calls)
        metrics["credit_seconds_per_sample"] = sum(b.scores.boundary_seconds for b in scored) / len(every)
    metrics.update(monitor_means(scored))
    return metrics


def monitor_means(scored) -> dict[str, float]:
    """The image monitors of an epoch's batches: each batch's, averaged (batches are of one size) over
    the batches that have it, since image_diversity is absent where no prompt was sampled twice."""
    means = {}
    for name in dict.fromkeys(name for b in scored for name in b.monitors):
        values = [b.monitors[name] for b in scored if name in b.monitors]
        means[name] = sum(values) / len(values)
    return means


class RunRecorder:
    def __init__(self, run: RunDir, config: Config):
        self.run = run
        self.config = config

    # ------------------------------------------------------------------ per epoch

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
        if checkpoint is not None:  # the learner has written its files; the driver's state completes it
            complete_checkpoint(run, checkpoint, state)

    def record_heldout_images(self, epoch: int, images) -> None:
        """The held-out evaluation's first samples after `epoch`, beside the epoch's training grid."""
        self.run.write_bytes(f"images/heldout-epoch-{epoch:04d}.png", image_grid_png(images))

    def write_config(self, start_epoch: int) -> None:
        """This session's config: config.yaml (the newest, which --resume reads as its base) and one more
        config_history/NNN-from-epoch-KKKK.yaml, so a resume with --set never erases what came before."""
        run = self.run
        if not run.list_files(CONFIG_HISTORY) and run.exists(CONFIG_FILE):  # a run from before the history
            run.write_bytes(f"{CONFIG_HISTORY}/000-from-epoch-0000.yaml", run.read_bytes(CONFIG_FILE))
        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False).encode()
        session = len(run.list_files(CONFIG_HISTORY))
        run.write_bytes(f"{CONFIG_HISTORY}/{session:03d}-from-epoch-{start_epoch:04d}.yaml", text)
        run.write_bytes(CONFIG_FILE, text)

