"""ppo_update on its own: the KL penalty's gradient, timestep_fraction, inner epochs, the decoupled
off-policy correction, and DDP over 2 gloo ranks giving the one-process gradient without
broadcasting the frozen UNet."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dense_rl.config import TrainConfig
from dense_rl.diffusion.pipeline import load_pipeline
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.diffusion.trajectories import Trajectories
from dense_rl.training.update import ignore_frozen_in_ddp, ppo_update
from support.training import GradientRecorder, with_lora

PROMPTS = ["a red cat", "a blue dog", "a cat", "a dog"]
STEPS = 4
# No clipping, no gradient clipping: the tests compare raw gradients.
TRAIN = TrainConfig(batch_size=4, clip_range=10.0, adv_clip_max=10.0, max_grad_norm=1e9)


def policy(folder, seed=0, lora_scale=0.3):
    """The tiny SD pipeline with a LoRA whose B weights are non-zero (so the policy differs from the base)."""
    pipe = load_pipeline(folder)
    params = with_lora(pipe, seed, lora_scale)
    return pipe, params


def sample(pipe, guidance_scale=1.0, seed=0) -> Trajectories:
    return sample_trajectories(pipe, PROMPTS, num_steps=STEPS, guidance_scale=guidance_scale, eta=1.0,
                               generator=torch.Generator().manual_seed(seed))


def update(pipe, params, trajectories, advantages, train=TRAIN, guidance_scale=1.0, **kwargs):
    optimizer = GradientRecorder(params)
    info = ppo_update(pipe.unet, pipe.scheduler, optimizer, params, trajectories, advantages, train, eta=1.0,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0), **kwargs)
    return optimizer.grads, info


@pytest.fixture(scope="module")
def pipe_and_params(tiny_sd_dir):
    return policy(tiny_sd_dir)


def test_kl_gradient_matches_the_closed_form(pipe_and_params):
    """With zero advantages the loss is kl_beta * KL alone; its gradient must be that of the closed form
    KL(N(m, s^2) || N(m_ref, s^2)) = (m - m_ref)^2 / (2 s^2), with both means from diffusers' own
    DDIMScheduler.step (zero noise) and the base model as reference."""
    pipe, params = pipe_and_params
    trajectories = sample(pipe)
    beta = 0.7
    grads, info = update(pipe, params, trajectories, torch.zeros(len(PROMPTS), STEPS),
                         train=dataclasses.replace(TRAIN, kl_beta=beta))
    assert len(grads) == 1 and info["kl_to_reference"] > 0

    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(STEPS)
    embeds = trajectories.prompt_embeds
    total = 0.0
    for k, t in enumerate(scheduler.timesteps):
        x = trajectories.latents[:, k]
        prev_t = int(t) - scheduler.config.num_train_timesteps // STEPS
        std = scheduler._get_variance(int(t), prev_t).sqrt()  # eta = 1
        zeros = torch.zeros_like(x)
        mean = scheduler.step(unet(x, t, encoder_hidden_states=embeds).sample, t, x, eta=1.0,
                              variance_noise=zeros).prev_sample
        with torch.no_grad():
            unet.disable_adapters()
            reference = scheduler.step(unet(x, t, encoder_hidden_states=embeds).sample, t, x, eta=1.0,
                                       variance_noise=zeros).prev_sample
            unet.enable_adapters()
        kl_per_row = ((mean - reference) ** 2 / (2 * std**2)).flatten(1).mean(1)
        total = total + kl_per_row.mean() / STEPS
    expected = torch.autograd.grad(beta * total, params)
    expected = torch.cat([g.flatten() for g in expected])
    torch.testing.assert_close(grads[0], expected, rtol=1e-4, atol=1e-7)
    assert info["kl_to_reference"] == pytest.approx(float(total.detach()), rel=1e-4)


def _visits(pipe, trajectories, run):
    """Run `run()` while recording which (row, step) each UNet call trains: each row's latent at step k
    is unique, so the UNet's input identifies it."""
    lookup = {}
    for row in range(trajectories.batch_size):
        for k in range(trajectories.num_steps):
            lookup[trajectories.latents[row, k].numpy().tobytes()] = (row, k)
    visits = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():  # training calls only, not the gradient-free rescoring
            for sample in args[0]:
                visits.append(lookup[sample.detach().numpy().tobytes()])

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return visits, result


def test_timestep_fraction_trains_exactly_that_many_steps_of_each_row(pipe_and_params):
    pipe, params = pipe_and_params
    trajectories = sample(pipe)
    train = dataclasses.replace(TRAIN, timestep_fraction=0.5, batch_size=2)
    visits, (grads, info) = _visits(pipe, trajectories, lambda: update(
        pipe, params, trajectories, torch.randn(len(PROMPTS), STEPS), train=train))
    assert info["optimizer_steps"] == 2 and len(grads) == 2
    for row in range(len(PROMPTS)):
        steps = [k for r, k in visits if r == row]
        assert len(steps) == 2 and len(set(steps)) == 2  # ceil(4 * 0.5) distinct steps, each once


def test_inner_epochs_repeat_every_step_against_the_sampling_log_probs(pipe_and_params):
    pipe, params = pipe_and_params
    trajectories = sample(pipe)
    train = dataclasses.replace(TRAIN, num_inner_epochs=3, batch_size=2, clip_range=1e-4)  # SD's clip range
    visits, (grads, info) = _visits(pipe, trajectories, lambda: update(
        pipe, params, trajectories, torch.randn(len(PROMPTS), STEPS), train=train))
    assert info["optimizer_steps"] == 6 and len(grads) == 6
    assert sorted(visits) == sorted([(r, k) for r in range(len(PROMPTS)) for k in range(STEPS)] * 3)
    # GradientRecorder leaves the weights alone: every pass scores the same policy, so every rescored
    # step's ratio is within 1e-4 of 1 (no clipping), not just their mean.
    assert info["clipfrac"] == 0.0 and info["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_a_stale_batch_is_clipped_around_the_learners_own_policy(tiny_sd_dir):
    """Async mode: a batch sampled by version 0, trained by a learner that has moved on (version 1). The
    ratio is taken against the learner's own log-probs (no sample starts clipped), the importance weight
    exp(proximal - behaviour) carries the difference, and the gradient is the importance-weighted one.
    One row a minibatch: the first is its own proximal, the other three take theirs from the proximal
    pass (compute_proximal on the start weights; GradientRecorder leaves the weights where they are),
    so a pass on the wrong rows, weights, guidance, embeddings or step would show as clipped ratios."""
    sampler, _ = policy(tiny_sd_dir, seed=0)
    learner, params = policy(tiny_sd_dir, seed=0)
    stale = sample(sampler, guidance_scale=3.0)
    with torch.no_grad():  # the learner has taken a step since: its LoRA differs
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    advantages = torch.randn(len(PROMPTS), STEPS, generator=torch.Generator().manual_seed(4))
    train = dataclasses.replace(TRAIN, clip_range=1e-3, batch_size=1)  # four minibatches, three rescored

    naive_grads, naive = update(learner, params, stale, advantages, train=train, guidance_scale=3.0)
    grads, corrected = update(learner, params, stale, advantages, train=train, guidance_scale=3.0, learner_version=1)
    assert naive["clipfrac"] > 0.5  # the stale log-probs put most ratios outside 1 +- 1e-3
    assert corrected["off_policy"] == 1.0 and corrected["optimizer_steps"] == len(PROMPTS)
    assert corrected["proximal_seconds"] > 0 and corrected["proximal_from_rollouts"] == 0.0  # computed here
    # Every trained step of every row, the rescored ones included, is within 1e-3 of its proximal log-prob.
    assert corrected["clipfrac"] == 0.0
    assert corrected["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(corrected["importance_weight"] - 1.0) > 1e-3

    # Same batch relabelled as the learner's own samples (log-probs rescored): the on-policy gradient,
    # which the corrected one must equal after weighting each term by its importance weight.
    from dense_rl.diffusion.policy import StepPolicy
    from dense_rl.training.update import proximal_log_probs

    proximal = proximal_log_probs(learner.unet, StepPolicy(learner.scheduler, eta=1.0), stale, stale.stochastic_steps,
                                  batch_size=1, guidance_scale=3.0, device=torch.device("cpu"), dtype=torch.float32)
    weights = torch.exp(proximal - stale.log_probs)
    relabelled = dataclasses.replace(stale, log_probs=proximal, policy_version=1)
    weighted_grads, _ = update(learner, params, relabelled, advantages * weights, train=train, guidance_scale=3.0,
                               learner_version=1)
    assert len(grads) == len(weighted_grads) == len(PROMPTS)
    for corrected_grad, weighted_grad in zip(grads, weighted_grads):  # same generator: the same row order
        torch.testing.assert_close(corrected_grad, weighted_grad, rtol=1e-4, atol=1e-8)
    assert torch.nn.functional.cosine_similarity(grads[0], naive_grads[0], dim=0) < 0.999


class SteppingRecorder(torch.optim.SGD):
    """Plain SGD that also keeps the gradient of every step: the weights move between minibatches."""

    def __init__(self, params, lr=0.5):
        super().__init__(params, lr=lr)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in self.param_groups[0]["params"]]))
        return super().step(closure)


def test_a_stale_batch_takes_its_proximal_log_probs_from_the_update_start_minibatch_by_minibatch(tiny_sd_dir, monkeypatch):
    """The proximal policy is the learner's weights when the update starts. The first minibatch is its
    own proximal; each later minibatch asks fetch_proximal for its rows (the rollouts, in the Ray
    system), in the order seeds.minibatch_rows predicts, and without an answer computes them on the
    start weights, after optimizer steps have moved the live ones. Both give the update that
    precomputed proximal log-probs give, and fetched values are really used."""
    from dense_rl.diffusion.policy import StepPolicy
    from dense_rl.training.seeds import minibatch_rows
    from dense_rl.training.update import proximal_log_probs

    sampler, _ = policy(tiny_sd_dir, seed=0)
    stale = sample(sampler)
    advantages = torch.randn(len(PROMPTS), STEPS, generator=torch.Generator().manual_seed(4))
    train = dataclasses.replace(TRAIN, batch_size=1, clip_range=1e-2)  # four minibatches, four optimizer steps

    def run(fetched=None):
        learner, params = policy(tiny_sd_dir, seed=0)
        with torch.no_grad():  # the learner has moved on since the batch was sampled
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
        if fetched == "exact":
            step_policy = StepPolicy(learner.scheduler, eta=1.0)
            step_policy.set_timesteps(STEPS, "cpu")
            fetched = proximal_log_probs(learner.unet, step_policy, stale, stale.stochastic_steps, batch_size=4, guidance_scale=1.0,
                                         device=torch.device("cpu"), dtype=torch.float32)
        asked = []

        def fetch(rows):
            asked.append(rows.tolist())
            return None if fetched is None else fetched[rows]

        optimizer = SteppingRecorder(params)
        info = ppo_update(learner.unet, learner.scheduler, optimizer, params, stale, advantages, train, eta=1.0,
                          guidance_scale=1.0, generator=torch.Generator().manual_seed(0), learner_version=1,
                          fetch_proximal=fetch)
        return optimizer.grads, info, asked

    local_grads, local, asked = run()
    fetched_grads, fetched, _ = run("exact")
    assert asked == [rows.tolist() for rows in minibatch_rows(len(PROMPTS), 1, seed=0)[1:]]
    assert local["proximal_from_rollouts"] == 0.0 and fetched["proximal_from_rollouts"] == 1.0
    assert len(local_grads) == len(fetched_grads) == len(PROMPTS)
    for a, b in zip(local_grads, fetched_grads):  # the same up to rounding (one row a pass here, four there)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Log-probs from the moved weights (or anything else) change the later steps, not the first.
    wrong_grads, _, _ = run(stale.log_probs + 0.01)
    torch.testing.assert_close(wrong_grads[0], local_grads[0])
    assert not torch.allclose(wrong_grads[1], local_grads[1], rtol=1e-3)
    # The local pass really ran on the start weights: on the moved ones the later steps differ.
    from dense_rl.training import update as update_module

    monkeypatch.setattr(update_module, "weights_set_to", lambda params, values: contextlib.nullcontext())
    live_grads, _, _ = run()
    torch.testing.assert_close(live_grads[0], local_grads[0])
    assert not torch.allclose(live_grads[-1], local_grads[-1], rtol=1e-3)


def test_the_rollouts_are_asked_for_proximal_log_probs_in_the_order_the_ranks_train():
    """ask_for_proximal: every row a rank trains after its first minibatch is asked for once, with the
    rollout batch that holds it; first the second minibatch, which the rank needs first (in the order
    the test above checks), of every rank, then the rest; the first minibatch only when inner epochs
    repeat."""
    from dense_rl.system.roles.learner import ask_for_proximal, rank_shares
    from dense_rl.training.seeds import minibatch_rows

    kept = [row for row in range(32) if row not in (5, 20)]  # two samples left out (a NaN reward)
    share, shares = rank_shares(kept, num_ranks=2, rows_per_batch=16, epoch=0)
    seeds = [11, 12]
    calls = []

    def rescore(pieces):
        calls.append(pieces)
        return len(calls) - 1  # stands for the ObjectRef

    asked = ask_for_proximal(shares, rescore, minibatch_size=4, seeds=seeds, first_minibatch_too=False)
    assert [call for rank in range(2) for call, _ in asked[rank]] == [0, 2, 1, 3]  # both ranks' second minibatch first
    for rank, (pieces, seed) in enumerate(zip(shares, seeds)):
        where = [(batch, row) for batch, rows in pieces for row in rows]
        minibatches = [rows.tolist() for rows in minibatch_rows(share, 4, seed)]
        (second, second_rows), (rest, rest_rows) = asked[rank]
        assert sorted(second_rows) == sorted(minibatches[1])
        assert sorted(rest_rows) == sorted(row for minibatch in minibatches[2:] for row in minibatch)
        for call, rows in asked[rank]:  # the answer's rows, in order, are the pieces' rows
            assert [where[row] for row in rows] == [(batch, row) for batch, rows_in_batch in calls[call]
                                                    for row in rows_in_batch]

    calls.clear()
    again = ask_for_proximal(shares, rescore, minibatch_size=4, seeds=seeds, first_minibatch_too=True)
    assert sorted(row for _, rows in again[0] for row in rows) == list(range(share))


def test_a_fresh_batch_is_not_rescored(pipe_and_params):
    """A batch of the learner's own version trains against its stored log-probs: no proximal pass, one
    UNet call per trained (row, step). One row a minibatch, so a batch a version older, the control,
    asks fetch_proximal for each of the three later minibatches and rescores their rows here."""
    pipe, params = pipe_and_params
    trajectories = dataclasses.replace(sample(pipe), policy_version=2)
    train = dataclasses.replace(TRAIN, batch_size=1)

    def run(learner_version):
        asked, calls = [], []

        def fetch(rows):
            asked.append(rows.tolist())
            return None  # no answer: a stale batch's rows are rescored here

        handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
        try:
            _, info = update(pipe, params, trajectories, torch.randn(len(PROMPTS), STEPS), train=train,
                             learner_version=learner_version, fetch_proximal=fetch)
        finally:
            handle.remove()
        return info, asked, sum(calls)

    info, asked, unet_rows = run(learner_version=2)
    assert info["off_policy"] == 0.0 and asked == [] and info["proximal_seconds"] == 0.0
    assert unet_rows == len(PROMPTS) * STEPS  # guidance 1: one UNet row per trained step
    stale_info, stale_asked, stale_rows = run(learner_version=3)
    assert stale_info["off_policy"] == 1.0 and len(stale_asked) == len(PROMPTS) - 1
    assert stale_info["proximal_seconds"] > 0 and stale_rows == (2 * len(PROMPTS) - 1) * STEPS


# ---------------------------------------------------------------------- DDP over gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_gradient(rank: int, world_size: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        pipe, params = policy(folder)
        trajectories = sample(pipe, guidance_scale=3.0)
        advantages = torch.randn(len(PROMPTS), STEPS, generator=torch.Generator().manual_seed(7))
        share = len(PROMPTS) // world_size
        rows = list(range(rank * share, (rank + 1) * share))
        ignore_frozen_in_ddp(pipe.unet)  # as the learner wraps it
        ddp_unet = DistributedDataParallel(pipe.unet, find_unused_parameters=False)
        optimizer = GradientRecorder(params)
        ppo_update(ddp_unet, pipe.scheduler, optimizer, params, trajectories.select(rows), advantages[rows],
                   dataclasses.replace(TRAIN, batch_size=share), eta=1.0, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(rank))
        if rank == 0:
            torch.save(optimizer.grads[0], out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_gradient(tiny_sd_dir, tmp_path):
    out = str(tmp_path / "ddp_grad.pt")
    mp.start_processes(_rank_gradient, args=(2, _free_port(), tiny_sd_dir, out), nprocs=2, start_method="spawn")
    ddp_gradient = torch.load(out, weights_only=True)

    pipe, params = policy(tiny_sd_dir)
    trajectories = sample(pipe, guidance_scale=3.0)
    advantages = torch.randn(len(PROMPTS), STEPS, generator=torch.Generator().manual_seed(7))
    grads, _ = update(pipe, params, trajectories, advantages, guidance_scale=3.0)
    assert ddp_gradient.abs().max() > 0
    torch.testing.assert_close(ddp_gradient, grads[0], rtol=0, atol=1e-6)


def _rank_wrap(rank: int, world_size: int, port: int, folder: str, out: str) -> None:
    """Rank 1 changes one frozen and one LoRA weight, then both ranks wrap the UNet in DDP, once as
    the learner does and once plainly; rank 1 saves what each wrapping left of its changes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = {}
        for ignore in (True, False):
            pipe, params = policy(folder)
            frozen = pipe.unet.conv_in.weight
            if rank == 1:
                with torch.no_grad():
                    frozen.add_(1.0)
                    params[0].add_(1.0)
            result[f"{ignore}_ignored_elements"] = torch.tensor(ignore_frozen_in_ddp(pipe.unet) if ignore else 0)
            DistributedDataParallel(pipe.unet, find_unused_parameters=False)
            result[f"{ignore}_frozen"], result[f"{ignore}_lora"] = frozen.detach().clone(), params[0].detach().clone()
        if rank == 1:
            original, original_params = policy(folder)
            result["frozen_original"] = original.unet.conv_in.weight.detach().clone()
            result["lora_original"] = original_params[0].detach().clone()
            result["frozen_elements"] = torch.tensor(sum(p.numel() for p in original.unet.parameters() if not p.requires_grad))
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_synchronises_the_lora_but_not_the_frozen_unet(tiny_sd_dir, tmp_path):
    """The learner's wrapping broadcasts rank 0's LoRA to every rank, but no frozen weight (each rank
    loads the same model; SD 1.5's is 1.7 GB in float16): rank 1 keeps its changed frozen weight. A
    plain DDP wrapping, the control, overwrites it with rank 0's."""
    out = str(tmp_path / "wrap.pt")
    mp.start_processes(_rank_wrap, args=(2, _free_port(), tiny_sd_dir, out), nprocs=2, start_method="spawn")
    result = torch.load(out, weights_only=True)
    assert int(result["True_ignored_elements"]) == int(result["frozen_elements"]) > 0
    torch.testing.assert_close(result["True_frozen"], result["frozen_original"] + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(result["True_lora"], result["lora_original"], rtol=0, atol=0)
    torch.testing.assert_close(result["False_frozen"], result["frozen_original"], rtol=0, atol=0)
    torch.testing.assert_close(result["False_lora"], result["lora_original"], rtol=0, atol=0)


# ---------------------------------------------------------------------- host reads


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (each one waits for a GPU)."""

    READS = {"__bool__", "item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_sampling_and_the_update_read_nothing_back_per_step(tiny_sd_dir):
    """Sampling and PPO read device values on the host a fixed number of times, however many
    denoising steps they take: twice the steps, the same reads (the step checks run once, and the
    stored log-probs and the training batch cross between host and device once)."""
    reads = {}
    for steps in (4, 8):
        pipe, params = policy(tiny_sd_dir)
        with HostReads() as sampling:
            trajectories = sample_trajectories(pipe, PROMPTS, num_steps=steps, guidance_scale=3.0, eta=1.0,
                                               generator=torch.Generator().manual_seed(0))
        with HostReads() as updating:
            update(pipe, params, trajectories, torch.randn(len(PROMPTS), steps), guidance_scale=3.0)
        reads[steps] = (sampling.count, updating.count)
    assert reads[4] == reads[8], reads
