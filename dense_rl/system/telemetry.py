"""Prometheus metrics of a run, exported through Ray's metrics pipeline (`ray.util.metrics`).

Every process that records here is a Ray worker (the driver too: it holds a core worker once
`ray.init` has run), so each node's metrics agent serves the values on its metrics export port and
Prometheus finds that port in Ray's service-discovery file. Ray prefixes every name with `ray_` and
counters also get `_total`: `dense_rl_trajectories` is scraped as `ray_dense_rl_trajectories_total`.
Every series carries Ray's `SessionName` label (one per Ray cluster start); ours add `role`
(rollout, reward, learner, driver) and `actor` (the first 8 hex digits of the Ray actor id, as the
Ray dashboard shows it; `rank<N>` for learner workers).

Ray's agent forgets a gauge value that is not re-reported within two report intervals, so the last
value of every gauge is re-set by a background thread (`_GaugeKeeper`) for as long as the process lives.

The names, types and labels are listed in METRICS below and in README.md ("Watch it in Grafana").
"""

from __future__ import annotations

import math
import threading
import time

import ray

from dense_rl.run.records import monitor_means

# Latency buckets (seconds) wide enough for the tiny model on a CPU and SD 1.5 on a GPU alike.
SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000]
TAGS = ("role", "actor")

# name -> (kind, description, extra tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # rollout actors
    "dense_rl_trajectories": ("counter", "Trajectories sampled", ()),
    "dense_rl_images": ("counter", "Images generated (one per trajectory)", ()),
    "dense_rl_denoising_steps": ("counter", "Denoising steps run (UNet evaluations per image)", ()),
    "dense_rl_denoising_steps_per_second": ("gauge", "Denoising steps per second while sampling the last batch", ()),
    "dense_rl_rollout_batch_seconds": ("histogram", "Wall time to sample one trajectory batch", ()),
    # reward actors
    "dense_rl_reward_scoring_seconds": ("histogram", "Wall time to score one batch (rewards and step credits)", ()),
    # all working roles
    "dense_rl_busy_seconds": ("counter", "Seconds spent working; its rate is the role's busy fraction", ()),
    "dense_rl_policy_version": ("gauge", "Policy version an actor holds (rollout) or has published (learner)", ()),
    # learner workers
    "dense_rl_ppo_loss": ("gauge", "PPO-clip policy loss of the last update (mean over minibatches)", ()),
    "dense_rl_clip_fraction": ("gauge", "Fraction of steps whose ratio left the clip range, last update", ()),
    "dense_rl_approx_kl": ("gauge", "Approximate KL between the sampling and the updated policy, last update", ()),
    "dense_rl_grad_norm": ("gauge", "Gradient norm before clipping, last update (mean over optimizer steps)", ()),
    "dense_rl_learner_step_seconds": ("histogram", "Wall time of one learner update (all PPO minibatches)", ()),
    "dense_rl_weight_broadcast_seconds": ("histogram", "Wall time to publish new LoRA weights to every rollout actor", ()),
    "dense_rl_weight_broadcast_bytes": ("counter", "Bytes of LoRA weights published (one object-store copy per version)", ()),
    # driver, once per epoch
    "dense_rl_epoch": ("gauge", "Epochs finished", ()),
    "dense_rl_last_progress_timestamp_seconds": ("gauge", "Unix time of the driver's last finished epoch (or start)", ()),
    "dense_rl_reward": ("gauge", "Reward statistic over the last epoch's samples", ("stat",)),
    "dense_rl_reward_component": ("gauge", "Mean of each configured reward over the last epoch, before weighting", ("reward",)),
    "dense_rl_nonfinite_rewards": ("gauge", "Samples of the last epoch whose reward was NaN or infinite", ()),
    "dense_rl_credit_share": ("gauge", "Mean share of a trajectory's step credit in its first / last window", ("window",)),
    "dense_rl_credit_fallbacks": ("gauge", "CoCA rows of the last epoch that fell back to uniform credit", ()),
    "dense_rl_policy_lag": ("gauge", "Versions between the learner and a rollout actor's last batch, as it arrived", ()),
    "dense_rl_policy_lag_bound": ("gauge", "cluster.max_policy_lag", ()),
    "dense_rl_batches_waiting": ("gauge", "Batches between stages: in rollout, sampled and not yet scored, scored and not yet learned", ("stage",)),
    "dense_rl_epoch_phase_seconds": ("gauge", "The last epoch's duration split into sample / score / learn / sync / other", ("phase",)),
    "dense_rl_image_monitor": ("gauge", "Image statistics of the last epoch's samples: brightness, saturation, contrast, diversity", ("monitor",)),
    # driver, at each held-out evaluation
    "dense_rl_heldout_reward": ("gauge", "Held-out mean of each reward (trained, unseen, `trained`) and image monitor, newest evaluation", ("reward",)),
    "dense_rl_heldout_samples": ("gauge", "Training samples seen by the policy of the newest held-out evaluation", ()),
}


def _create(name: str):
    from ray.util.metrics import Counter, Gauge, Histogram

    kind, description, extra = METRICS[name]
    keys = TAGS + extra
    if kind == "counter":
        return Counter(name, description, tag_keys=keys)
    if kind == "gauge":
        return Gauge(name, description, tag_keys=keys)
    return Histogram(name, description, boundaries=SECONDS_BUCKETS, tag_keys=keys)


class _GaugeKeeper:
    """Holds this process' metric objects and re-sets every gauge's last value each report interval."""

    def __init__(self):
        self.metrics: dict[str, object] = {}
        self.gauges: dict[tuple, tuple[object, float, dict]] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def get(self, name: str):
        with self.lock:
            if name not in self.metrics:
                self.metrics[name] = _create(name)
            return self.metrics[name]

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        gauge = self.get(name)
        gauge.set(value, tags=tags)
        with self.lock:
            self.gauges[(name, tuple(sorted(tags.items())))] = (gauge, value, tags)
            if self.thread is None:
                self.thread = threading.Thread(target=self._refresh, name="dense-rl-gauges", daemon=True)
                self.thread.start()

    def reset(self) -> None:
        """Forget metrics and held gauge values (a driver process that starts a new Ray session)."""
        with self.lock:
            self.metrics.clear()
            self.gauges.clear()

    def _refresh(self) -> None:
        while True:
            # Read every time: a driver process may start a later Ray session with a shorter interval.
            time.sleep(min(max(ray._config.metrics_report_interval_ms() / 2000, 0.5), 5.0))
            if not ray.is_initialized():  # between sessions (driver) or shutting down: nothing to report to
                continue
            with self.lock:
                held = list(self.gauges.values())
            for gauge, value, tags in held:
                try:
                    gauge.set(value, tags=tags)
                except Exception:  # Ray shut down between the check and the call
                    break


_KEEPER = _GaugeKeeper()


def _tags(role: str, actor: str = "", **extra: str) -> dict[str, str]:
    return {"role": role, "actor": actor, **extra}


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    if value > 0:  # Ray's counters refuse zero increments
        _KEEPER.get(name).inc(float(value), tags=tags)


def _observe(name: str, value: float, tags: dict[str, str]) -> None:
    _KEEPER.get(name).observe(float(value), tags=tags)


def _set(name: str, value: float, tags: dict[str, str]) -> None:
    _KEEPER.set(name, float(value), tags)


def actor_label(handle=None) -> str:
    """The `actor` label: the current actor's id, or `handle`'s (ActorHandle._actor_id is the id the
    actor itself sees through get_actor_id(); Ray keeps no public accessor on the handle)."""
    actor_id = handle._actor_id.hex() if handle is not None else ray.get_runtime_context().get_actor_id()
    return (actor_id or "driver")[:8]


# ---------------------------------------------------------------------- actors


def record_rollout_batch(rows: int, num_steps: int, seconds: float) -> None:
    tags = _tags("rollout", actor_label())
    _inc("dense_rl_trajectories", rows, tags)
    _inc("dense_rl_images", rows, tags)
    _inc("dense_rl_denoising_steps", rows * num_steps, tags)
    _set("dense_rl_denoising_steps_per_second", rows * num_steps / max(seconds, 1e-9), tags)
    _observe("dense_rl_rollout_batch_seconds", seconds, tags)
    _inc("dense_rl_busy_seconds", seconds, tags)


def record_policy_version(role: str, version: int, actor: str | None = None) -> None:
    _set("dense_rl_policy_version", version, _tags(role, actor_label() if actor is None else actor))


def record_scoring(seconds: float) -> None:
    tags = _tags("reward", actor_label())
    _observe("dense_rl_reward_scoring_seconds", seconds, tags)
    _inc("dense_rl_busy_seconds", seconds, tags)


def record_learner_update(rank: int, info: dict, seconds: float) -> None:
    tags = _tags("learner", f"rank{rank}")
    for name, key in (("dense_rl_ppo_loss", "policy_loss"), ("dense_rl_clip_fraction", "clipfrac"),
                      ("dense_rl_approx_kl", "approx_kl"), ("dense_rl_grad_norm", "grad_norm")):
        if key in info:
            _set(name, info[key], tags)
    _observe("dense_rl_learner_step_seconds", seconds, tags)
    _inc("dense_rl_busy_seconds", seconds, tags)


def record_weight_broadcast(rank: int, version: int, seconds: float, num_bytes: int) -> None:
    tags = _tags("learner", f"rank{rank}")
    _observe("dense_rl_weight_broadcast_seconds", seconds, tags)
    _inc("dense_rl_weight_broadcast_bytes", num_bytes, tags)
    _inc("dense_rl_busy_seconds", seconds, tags)
    _set("dense_rl_policy_version", version, tags)


# ---------------------------------------------------------------------- driver


class DriverMetrics:
    """The driver's view: stage occupancy while an epoch runs, and per-epoch learning statistics."""

    def __init__(self, config, rollout_workers: list):
        _KEEPER.reset()  # values of an earlier run in this process must not be re-reported
        self.config = config
        self.rollout_labels = [actor_label(w) for w in rollout_workers]
        self.epoch_started_at = self.sampled_at = self.scored_at = time.perf_counter()
        _set("dense_rl_policy_lag_bound", config.cluster.max_policy_lag, _tags("driver"))
        _set("dense_rl_last_progress_timestamp_seconds", time.time(), _tags("driver"))
        self._waiting(0, 0, 0)

    def _waiting(self, rollout: int, score: int, learn: int) -> None:
        for stage, count in (("rollout", rollout), ("score", score), ("learn", learn)):
            _set("dense_rl_batches_waiting", count, _tags("driver", stage=stage))

    def epoch_started(self) -> None:
        self.epoch_started_at = self.sampled_at = self.scored_at = time.perf_counter()

    def count_stages(self, trajectory_refs: list, num_scored: int) -> None:
        """Batches in each stage, counted while the driver waits for an epoch's scores."""
        # fetch_local=False: readiness only; trajectories stay in the object store.
        sampled, _ = ray.wait(trajectory_refs, num_returns=len(trajectory_refs), timeout=0, fetch_local=False)
        if len(sampled) == len(trajectory_refs) and self.sampled_at <= self.epoch_started_at:
            self.sampled_at = time.perf_counter()
        self._waiting(len(trajectory_refs) - len(sampled), max(0, len(sampled) - num_scored), 0)

    def scoring_done(self) -> None:
        self.scored_at = time.perf_counter()
        self.sampled_at = max(self.sampled_at, self.epoch_started_at)

    def batches_arrived(self, epoch: int, scored: list, workers: list[int]) -> None:
        """Policy lag of each rollout actor's batches as they reached the driver (before any resampling);
        `workers[i]` is the index of the rollout actor that sampled batch i."""
        lags: dict[str, int] = {}
        for batch, worker in zip(scored, workers):
            actor = self.rollout_labels[worker]
            lags[actor] = max(lags.get(actor, 0), epoch - batch.policy_version)
        for actor, lag in lags.items():
            _set("dense_rl_policy_lag", lag, _tags("rollout", actor))

    def submitted(self, num_batches: int) -> None:
        self._waiting(0, 0, num_batches)

    def epoch_finished(self, epoch: int, scored: list, learner_metrics: dict) -> None:
        import torch

        driver = _tags("driver")
        self._waiting(0, 0, 0)
        rewards = torch.cat([b.scores.rewards for b in scored]).double()
        finite = rewards[torch.isfinite(rewards)]
        _set("dense_rl_nonfinite_rewards", len(rewards) - len(finite), driver)
        stats = {"mean": finite.mean(), "std": finite.std(), "min": finite.min(), "max": finite.max()} \
            if len(finite) > 1 else {k: math.nan for k in ("mean", "std", "min", "max")}
        for stat, value in stats.items():
            _set("dense_rl_reward", float(value), _tags("driver", stat=stat))
        for name in scored[0].scores.components:
            component = torch.cat([b.scores.components[name] for b in scored]).double()
            _set("dense_rl_reward_component", float(component.mean()), _tags("driver", reward=name))
        for name, value in monitor_means(scored).items():
            _set("dense_rl_image_monitor", value, _tags("driver", monitor=name.removeprefix("image_")))
        self._credit(scored)

        now = time.perf_counter()
        learn = float(learner_metrics.get("step_seconds", 0.0))
        sync = float(learner_metrics.get("broadcast_seconds", 0.0))
        phases = {"sample": self.sampled_at - self.epoch_started_at, "score": self.scored_at - self.sampled_at,
                  "learn": learn, "sync": sync}
        phases["other"] = max(0.0, now - self.epoch_started_at - sum(phases.values()))
        for phase, seconds in phases.items():
            _set("dense_rl_epoch_phase_seconds", seconds, _tags("driver", phase=phase))
        _set("dense_rl_epoch", epoch + 1, driver)
        _set("dense_rl_last_progress_timestamp_seconds", time.time(), driver)

    def heldout_evaluated(self, means: dict[str, float], samples: int) -> None:
        for name, value in means.items():
            _set("dense_rl_heldout_reward", value, _tags("driver", reward=name))
        _set("dense_rl_heldout_samples", samples, _tags("driver"))

    def _credit(self, scored: list) -> None:
        import torch

        _set("dense_rl_credit_fallbacks", sum(b.scores.num_fallbacks for b in scored), _tags("driver"))
        if scored[0].scores.step_weights is None:  # sparse credit: no per-step weights to describe
            return
        weights = torch.cat([b.scores.step_weights for b in scored]).double()
        window = self.config.credit.window_size
        for name, part in (("first", weights[:, :window]), ("last", weights[:, -window:])):
            _set("dense_rl_credit_share", float(part.sum(dim=1).mean()), _tags("driver", window=name))
