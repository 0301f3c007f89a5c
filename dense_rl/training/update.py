"""One PPO update of the LoRA policy on a batch of scored trajectories (every denoising step is a
PPO sample with its own advantage). Shared by the in-process loop and the Ray learner.

Two paths a GPU user takes need more than float32 on-policy PPO (docs/algorithm.md):

- **Half precision.** The frozen UNet runs in float16/bfloat16, the LoRA parameters and the step
  arithmetic (mean, std, log-prob, loss) in float32. Backpropagating through a float16 UNet, the
  per-element gradients of an SD-sized update (1/(T * rows * C*H*W) of the loss each) sit near
  float16's subnormal range, so a float16 UNet trains through a GradScaler: the loss is scaled up
  before backward, the LoRA gradients unscaled before clipping, and a step whose gradients overflowed
  is skipped while the scale shrinks. bfloat16 has float32's exponent range and needs no scaling.
- **Off-policy batches** (async mode: sampled by version e, trained by a learner at e + 1). Every
  stored action is rescored under the learner's weights at the start of the update (no gradient):
  those proximal log-probs are what the PPO ratio is clipped around, and the sampler's log-probs only
  enter through the importance weight (decoupled PPO, dense_rl.algo.ppo.ppo_clip_loss). That is one
  gradient-free forward per trained step, about a third of the update. The first minibatch needs none
  (its own forward runs on those weights); each later one takes its rows' from `fetch_proximal` (in
  the Ray system the rollout actors compute them, minibatch by minibatch, while the learner trains,
  RolloutWorker.rescore), else computes them here on a copy of the start weights (ProximalLogProbs).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch

from dense_rl.algo.ppo import gaussian_kl, ppo_clip_loss

# Statistics of the update kept as their extremes over every trained step, not as means.
EXTREMES = {"importance_weight_min": torch.minimum, "importance_weight_max": torch.maximum}
from dense_rl.config import TrainConfig
from dense_rl.diffusion.policy import StepPolicy, guided_model_output
from dense_rl.diffusion.trajectories import Trajectories, trained_step_range


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
    )


def ignore_frozen_in_ddp(model: torch.nn.Module) -> int:
    """Leave the frozen weights and the buffers out of DistributedDataParallel; returns how many
    elements that is. DDP would otherwise broadcast every one of them from rank 0 when it wraps the
    model (1.7 GB for SD 1.5's float16 UNet), and its buffers before every forward, although each rank
    loads the same frozen model itself. Only the LoRA parameters are synchronised (and all-reduced)."""
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    frozen |= dict(model.named_buffers())
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(frozen))
    return sum(t.numel() for t in frozen.values())


def make_grad_scaler(unet) -> torch.amp.GradScaler:
    """Loss scaling for a float16 UNet (a no-op otherwise). Keep one per learner, so the scale it has
    found carries over from one update to the next."""
    frozen = next(p for p in unet.parameters() if not p.requires_grad)
    # growth_interval: PPO takes a few optimizer steps per epoch, not thousands; let the scale climb
    # back within a few epochs after an overflow.
    return torch.amp.GradScaler(frozen.device.type, init_scale=2.0**16, growth_interval=20,
                                enabled=frozen.dtype == torch.float16)


def steps_to_train(trajectories: Trajectories, step_window: list[int] | tuple[int, int] | None) -> range:
    """The stochastic steps of `trajectories` that `train.step_window` ([start, stop); empty: all) trains."""
    return trained_step_range(trajectories.num_steps, trajectories.sde_window, step_window)


def ppo_update(
    unet,
    scheduler,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    trajectories: Trajectories,
    step_advantages: torch.Tensor,
    train: TrainConfig,
    *,
    eta: float,
    guidance_scale: float,
    generator: torch.Generator,
    noise_level: float = 0.7,
    learner_version: int | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    fetch_proximal: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    decoupled: bool = True,
) -> dict[str, float]:
    """PPO-clip over `train.num_inner_epochs` passes; one optimizer step per `train.batch_size` trajectories.

    `unet` is the denoiser (a UNet, or a flow transformer with `scheduler` a flow-matching one) and
    `eta`/`noise_level` the sampler's noise (StepPolicy). It may be wrapped in DistributedDataParallel:
    gradients are then all-reduced once per optimizer step, not once per denoising step. The steps
    trained are those of the trajectories' `sde_window` within `train.step_window` (steps_to_train);
    each trajectory trains on its own random subset of `timestep_fraction` of them, and each step keeps
    its own advantage. A batch sampled by a policy older than `learner_version` is trained with the
    decoupled (proximal) correction.

    The proximal log-probs are those of the weights at the start of the update. The first minibatch's
    own forward has exactly those weights, so it needs no separate pass; each later minibatch takes its
    rows' from `fetch_proximal(rows)` ([len(rows), T], computed elsewhere on the same weights, e.g. by
    the rollout actors) when it gives them, else they are computed here (ProximalLogProbs).
    `decoupled=False` trains an off-policy batch as plain PPO against the sampler's log-probs: only for
    tests that show what the correction changes.
    """
    num_trajectories, num_steps = step_advantages.shape
    if num_trajectories != trajectories.batch_size or num_steps != trajectories.num_steps:
        raise ValueError(
            f"step_advantages shape {tuple(step_advantages.shape)} does not match the trajectories "
            f"({trajectories.batch_size} x {trajectories.num_steps} steps)"
        )
    base_unet = getattr(unet, "module", unet)
    device = next(unet.parameters()).device
    dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    policy = StepPolicy(scheduler, eta=eta, noise_level=noise_level)
    policy.set_timesteps(num_steps, device)
    steps = steps_to_train(trajectories, train.step_window)
    trained_steps = torch.tensor(list(steps))
    policy.check_steps(trained_steps)  # once here; the steps below skip the check (it reads the device)
    steps_per_trajectory = max(1, math.ceil(len(trained_steps) * train.timestep_fraction))
    scaler = grad_scaler if grad_scaler is not None else make_grad_scaler(base_unet)
    common = dict(guidance_scale=guidance_scale, device=device, dtype=dtype)

    behaviour = trajectories.log_probs
    off_policy = learner_version is not None and trajectories.policy_version < learner_version
    correct = off_policy and decoupled
    proximal = None
    if correct:
        def compute_proximal(rows: torch.Tensor) -> torch.Tensor:
            unet.eval()
            values = proximal_log_probs(base_unet, policy, trajectories.select(rows), steps, batch_size=train.batch_size,
                                        **common)
            unet.train()
            return values

        proximal = ProximalLogProbs(params, behaviour, fetch_proximal, compute_proximal)

    sums: dict[str, torch.Tensor] = {}
    extremes: dict[str, torch.Tensor] = {}
    num_updates = skipped = 0
    unet.train()
    for _ in range(train.num_inner_epochs):
        order = torch.randperm(num_trajectories, generator=generator)
        for start in range(0, num_trajectories, train.batch_size):
            rows = order[start : start + train.batch_size]
            # Everything the batch's steps read goes to the device once: a copy from the host in
            # the step loop would wait for the device at every step.
            batch = trajectories.select(rows).to(device)
            advantages = step_advantages[rows].to(device)
            if not correct:
                old = behaviour[rows].to(device)
            else:  # the update's first minibatch runs on the start weights: its own forward is the proximal
                old = None if num_updates == 0 else proximal(rows).to(device)
            behaviour_of_batch = behaviour[rows].to(device) if correct else None
            # Each row trains on its own random subset of steps, with that step's own advantage.
            step_order = torch.stack([trained_steps[torch.randperm(len(trained_steps), generator=generator)]
                                      for _ in rows]).to(device)
            row_index = torch.arange(len(rows), device=device)

            optimizer.zero_grad(set_to_none=True)
            for j in range(steps_per_trajectory):
                step = step_order[:, j]
                last = j == steps_per_trajectory - 1
                sync = contextlib.nullcontext() if last or not hasattr(unet, "no_sync") else unet.no_sync()
                with sync:
                    loss, info = _step_loss(
                        unet, base_unet, policy, batch, row_index, step, train,
                        advantages=advantages[row_index, step], old_log_probs=None if old is None else old[row_index, step],
                        behaviour_log_probs=behaviour_of_batch[row_index, step] if correct else None, **common,
                    )
                    scaler.scale(loss / steps_per_trajectory).backward()
                for key, value in info.items():
                    if key in EXTREMES:
                        extremes[key] = EXTREMES[key](extremes[key], value) if key in extremes else value
                    else:
                        sums[key] = sums.get(key, 0.0) + value / steps_per_trajectory
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(optimizer)  # skipped when a gradient overflowed
            scaler.update()
            if scaler.is_enabled() and scaler.get_scale() < scale:
                skipped += 1
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach()
            if num_updates == 0:  # the first step's clip fraction shows how stale the batch was
                first_clipfrac = sums["clipfrac"].clone()
            num_updates += 1
    unet.eval()
    # Read once per update: nothing above waits for the device.
    result = {key: float(value) / num_updates for key, value in sums.items()}
    result |= {key: float(value) for key, value in extremes.items()}
    # After the first step the ratio is taken against the proximal policy (or, uncorrected, the sampler's).
    later_clipfrac = (float(sums["clipfrac"]) - float(first_clipfrac)) / (num_updates - 1) if num_updates > 1 else 0.0
    return result | {"optimizer_steps": num_updates, "skipped_steps": skipped, "off_policy": float(off_policy),
                     "first_step_clipfrac": float(first_clipfrac), "later_steps_clipfrac": later_clipfrac,
                     "proximal_from_rollouts": proximal.fraction_fetched if proximal else 0.0,
                     "proximal_seconds": proximal.seconds if proximal else 0.0,
                     "grad_scale": scaler.get_scale() if scaler.is_enabled() else 1.0}


class ProximalLogProbs:
    """Decoupled PPO's proximal log-probs of an off-policy batch, [B, T]: those of the weights when the
    update started, gathered as minibatches need them. Rows come from `fetch(rows)` ([len(rows), T],
    computed elsewhere on those weights) when it gives them, else from `compute(rows)` here, with a
    copy of the start weights put back for the pass (optimizer steps may have moved them since)."""

    def __init__(self, params: list[torch.nn.Parameter], behaviour: torch.Tensor,
                 fetch: Callable[[torch.Tensor], torch.Tensor | None] | None,
                 compute: Callable[[torch.Tensor], torch.Tensor]):
        self.params, self.fetch, self.compute = params, fetch, compute
        self.start_weights = [p.detach().clone() for p in params]  # LoRA only: small
        self.values = torch.zeros_like(behaviour)
        self.known = torch.zeros(len(behaviour), dtype=torch.bool)
        self.rows_needed = self.rows_fetched = 0
        self.seconds = 0.0  # waiting for fetched values, or computing them here

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        missing = rows[~self.known[rows]]
        if len(missing):
            started = time.perf_counter()
            values = self.fetch(missing) if self.fetch is not None else None
            if values is None:
                with weights_set_to(self.params, self.start_weights):
                    values = self.compute(missing)
            elif values.shape != (len(missing), self.values.shape[1]):
                raise ValueError(f"fetch_proximal gave {tuple(values.shape)} log-probs for {len(missing)} rows "
                                 f"of {self.values.shape[1]} steps")
            else:
                self.rows_fetched += len(missing)
            self.values[missing] = values.to(self.values.dtype)
            self.known[missing] = True
            self.rows_needed += len(missing)
            self.seconds += time.perf_counter() - started
        return self.values[rows]

    @property
    def fraction_fetched(self) -> float:
        return self.rows_fetched / self.rows_needed if self.rows_needed else 0.0


@contextlib.contextmanager
def weights_set_to(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """`params` hold `values` inside the block and their own values again after it."""
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        for param, value in zip(params, values):
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, own):
                param.copy_(value)


def score_actions(unet, policy: StepPolicy, batch: Trajectories, row_index, step, *, guidance_scale, device, dtype,
                  validate: bool = True):
    """Log-prob [rows] of the stored action at step `step[i]` of row `row_index[i]` under the current
    weights, and the guided model output it came from: the "score this action" call of PPO.
    `validate=False`: the steps were checked already (StepPolicy.check_steps)."""
    sample = batch.latents[row_index, step].to(device, dtype)
    prev_sample = batch.latents[row_index, step + 1].to(device, dtype)
    embeds, negative = batch.embeds(row_index, device, dtype)
    output = guided_model_output(unet, sample, policy.model_timesteps(step), embeds, negative, guidance_scale)
    _, log_prob, _ = policy.step(output, step, sample, prev_sample=prev_sample, validate=validate)
    return log_prob, output


@torch.no_grad()
def proximal_log_probs(unet, policy: StepPolicy, trajectories: Trajectories, steps: range, *, batch_size: int,
                       guidance_scale, device, dtype) -> torch.Tensor:
    """[B, T] log-probs of the actions at `steps` (those trained) under the current weights (decoupled
    PPO's proximal policy); 0 on the other steps. The caller has checked the steps
    (StepPolicy.check_steps), as ppo_update does."""
    num_rows, num_steps = trajectories.log_probs.shape
    result = torch.zeros(num_rows, num_steps, device=device)  # filled on the device, read back once
    for start in range(0, num_rows, batch_size):
        batch = trajectories.select(slice(start, start + batch_size)).to(device)
        rows = torch.arange(batch.batch_size, device=device)
        for k in steps:
            log_prob, _ = score_actions(unet, policy, batch, rows, torch.full_like(rows, k), guidance_scale=guidance_scale,
                                        device=device, dtype=dtype, validate=False)
            result[start + rows, k] = log_prob.float()
    return result.cpu()


def rescore_trajectories(model, scheduler, trajectories: Trajectories, *, eta: float, noise_level: float,
                         guidance_scale: float, batch_size: int, step_window: list[int] | None = None) -> torch.Tensor:
    """proximal_log_probs of `trajectories` under `model`'s current weights, with the step policy set up
    and checked here: what a rollout actor holding a learner's weights computes for it (RolloutWorker.rescore)."""
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
    policy = StepPolicy(scheduler, eta=eta, noise_level=noise_level)
    policy.set_timesteps(trajectories.num_steps, device)
    steps = steps_to_train(trajectories, step_window)
    policy.check_steps(steps)
    return proximal_log_probs(model, policy, trajectories, steps, batch_size=batch_size, guidance_scale=guidance_scale,
                              device=device, dtype=dtype)


def _step_loss(unet, base_unet, policy: StepPolicy, batch, row_index, step, train, *, advantages, old_log_probs,
               behaviour_log_probs, guidance_scale, device, dtype) -> tuple[torch.Tensor, dict]:
    """The loss of one denoising step for every row of `batch`, and its statistics (device tensors).
    `old_log_probs=None`: the current weights are the proximal policy (the update's first minibatch)."""
    log_prob, output = score_actions(unet, policy, batch, row_index, step,
                                     guidance_scale=guidance_scale, device=device, dtype=dtype, validate=False)
    if old_log_probs is None:
        old_log_probs = log_prob.detach()
    loss, info = ppo_clip_loss(log_prob, old_log_probs, advantages, train.clip_range, train.adv_clip_max,
                               behaviour_log_probs=behaviour_log_probs)
    info = {"policy_loss": loss.detach(), **info}
    if train.kl_beta > 0:
        sample = batch.latents[row_index, step].to(device, dtype)
        timesteps = policy.model_timesteps(step)
        embeds, negative = batch.embeds(row_index, device, dtype)
        mean, std, _ = policy.distribution(output, step, sample, validate=False)
        with torch.no_grad():
            base_unet.disable_adapters()
            try:
                reference_output = guided_model_output(base_unet, sample, timesteps, embeds, negative, guidance_scale)
            finally:
                base_unet.enable_adapters()
            reference_mean, _, _ = policy.distribution(reference_output, step, sample, validate=False)
        kl = gaussian_kl(mean, reference_mean, std)
        if train.kl_form == "flow_grpo":  # divided by std_dev_t^2, not the step's variance std_dev_t^2 * |dt|
            kl = kl * policy.step_size(step)
        kl = kl.mean()
        loss = loss + train.kl_beta * kl
        info["kl_to_reference"] = kl.detach()
    return loss, info
