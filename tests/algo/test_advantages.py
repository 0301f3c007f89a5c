"""compute_step_advantages with the step weights of each kind of credit: none (sparse), uniform, CoCA-like."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dense_rl.algo import credit
from dense_rl.algo.advantages import ADVANTAGE_MODES, compute_step_advantages
from dense_rl.algo.credit import shape_step_rewards, uniform_step_weights
from dense_rl.algo.normalisers import PerPromptStatTracker

PROMPTS = ["a", "b", "a", "b", "a", "b"]
REWARDS = np.array([1.0, 5.0, 2.0, 7.0, 6.0, 3.0])
NUM_STEPS = 4


def advantages_for_mode(prompts, rewards, step_weights, *, credit_mode, num_steps, **options):
    """compute_step_advantages with the step weights `credit_mode` gives: none for sparse, 1/T for
    uniform, `step_weights` for the others (as dense_rl.training.scoring hands them over)."""
    if credit_mode == "sparse":
        step_weights = None
    elif credit_mode == "uniform":
        step_weights = uniform_step_weights(len(prompts), num_steps)
    return compute_step_advantages(prompts, rewards, step_weights, num_steps=num_steps, **options)


def run(credit_mode, step_weights=None, *, temporal_alpha=0.0, adv_clip_max=5.0, min_count=1):
    return advantages_for_mode(
        PROMPTS,
        REWARDS,
        step_weights,
        credit_mode=credit_mode,
        num_steps=NUM_STEPS,
        reward_tracker=PerPromptStatTracker(buffer_size=32, min_count=min_count),
        step_tracker=PerPromptStatTracker(buffer_size=32, min_count=min_count),
        temporal_alpha=temporal_alpha,
        adv_clip_max=adv_clip_max,
        window_size=2,
    )


def first_stage(prompts=PROMPTS, rewards=REWARDS):
    return PerPromptStatTracker(buffer_size=32, min_count=1).update(prompts, rewards)


def coca_like_weights():
    return torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]).repeat(3, 1)


def test_sparse_gives_the_trajectory_advantage_on_every_step():
    advantages, info = run("sparse")
    assert advantages.shape == (6, NUM_STEPS) and advantages.dtype == torch.float32
    assert torch.equal(advantages, advantages[:, :1].expand(-1, NUM_STEPS))
    torch.testing.assert_close(advantages[:, 0], torch.from_numpy(first_stage()))
    assert info["adv_clip_frac"] == 0.0
    assert info["reward_mean"] == pytest.approx(REWARDS.mean())


@pytest.mark.parametrize("credit_mode", ["uniform", "coca"])
def test_dense_modes_apply_the_second_normalisation_per_prompt(credit_mode):
    step_weights = coca_like_weights() if credit_mode == "coca" else None
    advantages, info = run(credit_mode, step_weights)
    assert advantages.shape == (6, NUM_STEPS) and advantages.dtype == torch.float32
    weights = step_weights if credit_mode == "coca" else uniform_step_weights(6, NUM_STEPS)
    step_rewards = shape_step_rewards(torch.from_numpy(first_stage()), weights, 0.0).numpy()
    for prompt in ("a", "b"):
        rows = [i for i, p in enumerate(PROMPTS) if p == prompt]
        expected = (step_rewards[rows] - step_rewards[rows].mean()) / (step_rewards[rows].std() + 1e-6)
        np.testing.assert_allclose(advantages[rows].numpy(), expected, rtol=1e-5, atol=1e-6)
        # After the second stage each prompt's step advantages have mean 0 and std 1.
        assert advantages[rows].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert advantages[rows].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert not torch.equal(advantages, advantages[:, :1].expand(-1, NUM_STEPS))
    if credit_mode == "coca":
        assert info["credit_first_window"] == pytest.approx(0.55)
        assert info["credit_last_window"] == pytest.approx(0.45)


def test_uniform_ignores_the_cosines():
    """Whether uniform credit reads the cosine curve is decided by the registry's mode (scoring hands
    its weights to compute_step_advantages): two different curves must give the same 1/T weights."""
    generator = torch.Generator().manual_seed(0)

    def uniform_weights(cosines):
        inputs = credit.CreditInputs(torch.from_numpy(REWARDS).float(), NUM_STEPS, 2, cosines=cosines)
        weights, fallback = credit.credit_mode("uniform").step_weights(inputs)
        assert not fallback.any()
        return weights

    cosines = torch.rand(6, NUM_STEPS, generator=generator).sort(1).values
    rising, falling = uniform_weights(cosines), uniform_weights(cosines.flip(1))
    assert torch.equal(rising, falling) and torch.equal(rising, uniform_step_weights(6, NUM_STEPS))


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
def test_advantages_are_clipped(credit_mode):
    step_weights = coca_like_weights() if credit_mode == "coca" else None
    advantages, info = run(credit_mode, step_weights, adv_clip_max=0.5)
    assert advantages.abs().max().item() == pytest.approx(0.5)
    assert info["adv_clip_frac"] > 0
    if credit_mode != "sparse":
        assert info["step_adv_clip_frac"] > 0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        run("coca", torch.full((6, 3), 1 / 3))
    with pytest.raises(ValueError, match="prompts"):
        advantages_for_mode(
            PROMPTS[:2], REWARDS, None, credit_mode="sparse", num_steps=NUM_STEPS,
            reward_tracker=PerPromptStatTracker(8, 1), step_tracker=None, temporal_alpha=0.0, adv_clip_max=5.0,
        )
    with pytest.raises(ValueError, match="step_tracker"):
        advantages_for_mode(
            PROMPTS, REWARDS, None, credit_mode="uniform", num_steps=NUM_STEPS,
            reward_tracker=PerPromptStatTracker(8, 1), step_tracker=None, temporal_alpha=0.0, adv_clip_max=5.0,
        )


# --------------------------------------------------------------------------- group (GRPO) advantages
# Two prompts interleaved, two samples each: x -> [1, 3] (mean 2, population std 1),
# y -> [10, 14] (mean 12, population std 2).
G_PROMPTS = ["x", "y", "x", "y"]
G_REWARDS = np.array([1.0, 10.0, 3.0, 14.0])
G_STEPS = 2
# Rows in G_PROMPTS order: x0, y0, x1, y1.
EPS = 1e-4  # the group normaliser's, Flow-GRPO's: (v - mean) / (std + 1e-4)
# With std: x -> +-1/(1 + EPS) (its std is 1), y -> +-2/(2 + EPS).
A_X, A_Y = 1 / (1 + EPS), 2 / (2 + EPS)
G_COCA_WEIGHTS = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.4, 0.6], [1.0, 0.0]])


def run_group(credit_mode, step_weights=None, *, group_std=True, prompts=G_PROMPTS, rewards=G_REWARDS,
              adv_clip_max=5.0, reward_tracker=None, step_tracker=None):
    return advantages_for_mode(
        prompts, rewards, step_weights, credit_mode=credit_mode, num_steps=G_STEPS,
        reward_tracker=reward_tracker, step_tracker=step_tracker, temporal_alpha=0.0,
        adv_clip_max=adv_clip_max, window_size=1, advantages="group", group_std=group_std,
    )


def rows_of(values, order=(0, 2, 1, 3)):
    """Hand-written [x0, x1, y0, y1] rows back into G_PROMPTS order [x0, y0, x1, y1]."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    out[list(order)] = values
    return out


@pytest.mark.parametrize("group_std, expected", [(True, [-A_X, A_X, -A_Y, A_Y]), (False, [-1.0, 1.0, -2.0, 2.0])])
def test_group_sparse_is_the_group_relative_reward_on_every_step(group_std, expected):
    advantages, info = run_group("sparse", group_std=group_std)
    # [x0, x1, y0, y1]: std on -> (r - mean) / (std + EPS); std off -> r - mean. Population std (ddof=0,
    # as Flow-GRPO): x = [1, 3] -> +-1 / (1 + EPS); the sample std (ddof=1) would give +-0.707.
    expected = rows_of(expected)
    np.testing.assert_allclose(advantages.numpy(), np.repeat(expected[:, None], G_STEPS, 1), rtol=1e-5)
    assert info["adv_clip_frac"] == 0.0 and info["group_size_mean"] == 2.0
    assert info["group_single_frac"] == 0.0 and info["group_zero_std_frac"] == 0.0


@pytest.mark.parametrize("group_std", [True, False])
def test_group_uniform_normalises_the_step_rewards_within_each_group(group_std):
    # Uniform weights 1/2 -> remaining credit G = [1, 0.5]; step rewards r_t = A * G_t.
    advantages, info = run_group("uniform", group_std=group_std)
    if group_std:
        # A = [-a, a] (a = A_X, A_Y) -> steps a [[-1, -0.5], [1, 0.5]]: mean 0, std a sqrt(0.625).
        x, y = (a * np.array([[-1.0, -0.5], [1.0, 0.5]]) / (a * np.sqrt(0.625) + EPS) for a in (A_X, A_Y))
    else:
        # A: x [-1, 1], y [-2, 2]; each group's step rewards already have mean 0.
        x, y = np.array([[-1.0, -0.5], [1.0, 0.5]]), np.array([[-2.0, -1.0], [2.0, 1.0]])
    np.testing.assert_allclose(advantages.numpy(), rows_of(np.concatenate([x, y])), rtol=1e-5, atol=1e-6)
    assert info["step_adv_clip_frac"] == 0.0


@pytest.mark.parametrize("group_std", [True, False])
def test_group_coca_normalises_the_step_rewards_within_each_group(group_std):
    # Remaining credit: x0 [1, 0.2], x1 [1, 0.6], y0 [1, 0.5], y1 [1, 0].
    advantages, info = run_group("coca", G_COCA_WEIGHTS, group_std=group_std)
    if group_std:
        # A = [-a, a] with a = A_X, A_Y.
        # x: a [[-1, -0.2], [1, 0.6]], mean 0.1a -> centred a [[-1.1, -0.3], [0.9, 0.5]], var a^2 2.36 / 4.
        # y: a [[-1, -0.5], [1, 0]], mean -0.125a -> a [[-0.875, -0.375], [1.125, 0.125]], var a^2 2.1875 / 4.
        x = A_X * np.array([[-1.1, -0.3], [0.9, 0.5]]) / (A_X * np.sqrt(0.59) + EPS)
        y = A_Y * np.array([[-0.875, -0.375], [1.125, 0.125]]) / (A_Y * np.sqrt(0.546875) + EPS)
    else:
        # A: x [-1, 1] as above, y [-2, 2] -> [[-2, -1], [2, 0]], mean -0.25.
        x = np.array([[-1.1, -0.3], [0.9, 0.5]])
        y = np.array([[-1.75, -0.75], [2.25, 0.25]])
    np.testing.assert_allclose(advantages.numpy(), rows_of(np.concatenate([x, y])), rtol=1e-5, atol=1e-6)
    assert info["credit_first_window"] == pytest.approx(0.675)


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
def test_group_of_one_sample_gets_zero_advantage(credit_mode):
    prompts, rewards = ["x", "x", "z"], np.array([1.0, 3.0, 100.0])
    step_weights = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]) if credit_mode == "coca" else None
    advantages, info = run_group(credit_mode, step_weights, prompts=prompts, rewards=rewards)
    assert torch.equal(advantages[2], torch.zeros(G_STEPS))
    assert advantages[:2].abs().min().item() > 0.1  # the group of two still learns
    assert info["group_single_frac"] == pytest.approx(0.5) and info["group_size_mean"] == 1.5
    # A lone sample alone in the call: nothing to compare with, so nothing to learn.
    lone_weights = None if step_weights is None else step_weights[2:]
    alone, _ = run_group(credit_mode, lone_weights, prompts=["z"], rewards=rewards[2:])
    assert torch.equal(alone, torch.zeros(1, G_STEPS))


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
def test_groups_are_formed_by_prompt_not_by_position(credit_mode):
    step_weights = G_COCA_WEIGHTS if credit_mode == "coca" else None
    advantages, _ = run_group(credit_mode, step_weights)
    # Any reordering of the rows reorders the advantages the same way.
    perm = [3, 0, 2, 1]
    permuted, _ = run_group(credit_mode, None if step_weights is None else step_weights[perm],
                            prompts=[G_PROMPTS[i] for i in perm], rewards=G_REWARDS[perm])
    torch.testing.assert_close(permuted, advantages[perm])
    # Grouping consecutive pairs of rows instead ([x0, y0], [x1, y1]) would give another answer.
    by_position, _ = run_group(credit_mode, step_weights, prompts=["p", "p", "q", "q"])
    assert not torch.allclose(by_position, advantages)


def test_group_equal_rewards_give_zero_and_are_counted():
    advantages, info = run_group("uniform", rewards=np.array([2.0, 10.0, 2.0, 14.0]))
    assert torch.equal(advantages[[0, 2]], torch.zeros(2, G_STEPS))  # x: [2, 2], no signal
    assert info["group_zero_std_frac"] == pytest.approx(0.5)


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
def test_group_advantages_are_clipped_and_report_the_same_keys(credit_mode):
    step_weights = G_COCA_WEIGHTS if credit_mode == "coca" else None
    advantages, info = run_group(credit_mode, step_weights, adv_clip_max=0.5)
    assert advantages.abs().max().item() == pytest.approx(0.5)
    assert info["adv_clip_frac"] == 1.0
    _, per_prompt_info = advantages_for_mode(
        G_PROMPTS, G_REWARDS, step_weights, credit_mode=credit_mode, num_steps=G_STEPS,
        reward_tracker=PerPromptStatTracker(8, 1), step_tracker=PerPromptStatTracker(8, 1),
        temporal_alpha=0.0, adv_clip_max=0.5, window_size=1,
    )
    assert set(per_prompt_info) <= set(info)
    if credit_mode != "sparse":
        assert info["step_adv_clip_frac"] > 0


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
def test_group_mode_leaves_the_trackers_alone(credit_mode):
    step_weights = G_COCA_WEIGHTS if credit_mode == "coca" else None
    reward_tracker, step_tracker = PerPromptStatTracker(8, 1), PerPromptStatTracker(8, 1)
    with_trackers, _ = run_group(credit_mode, step_weights, reward_tracker=reward_tracker, step_tracker=step_tracker)
    assert reward_tracker.stats()["num_prompts"] == 0 and step_tracker.stats()["num_prompts"] == 0
    torch.testing.assert_close(with_trackers, run_group(credit_mode, step_weights)[0])


@pytest.mark.parametrize("credit_mode", ["sparse", "uniform", "coca"])
def test_per_prompt_default_is_unchanged_by_the_group_options(credit_mode):
    step_weights = coca_like_weights() if credit_mode == "coca" else None
    default, default_info = run(credit_mode, step_weights)
    for group_std in (True, False):  # ignored by the per-prompt trackers
        explicit, explicit_info = advantages_for_mode(
            PROMPTS, REWARDS, step_weights, credit_mode=credit_mode, num_steps=NUM_STEPS,
            reward_tracker=PerPromptStatTracker(buffer_size=32, min_count=1),
            step_tracker=PerPromptStatTracker(buffer_size=32, min_count=1),
            temporal_alpha=0.0, adv_clip_max=5.0, window_size=2, advantages="per_prompt", group_std=group_std,
        )
        torch.testing.assert_close(explicit, default)
        assert explicit_info == default_info
    assert not any(key.startswith("group_") for key in default_info)
    # On fresh trackers (min_count 1) each prompt's buffer is just this epoch's rows, so the two
    # modes agree on the first epoch, up to their eps (1e-6 per prompt, 1e-4 in groups); once the
    # buffer spans epochs they part ways.
    def group(rewards):
        return advantages_for_mode(
            PROMPTS, rewards, step_weights, credit_mode=credit_mode, num_steps=NUM_STEPS, reward_tracker=None,
            step_tracker=None, temporal_alpha=0.0, adv_clip_max=5.0, window_size=2, advantages="group",
        )[0]

    torch.testing.assert_close(group(REWARDS), default, rtol=5e-4, atol=1e-5)
    trackers = dict(reward_tracker=PerPromptStatTracker(32, 1), step_tracker=PerPromptStatTracker(32, 1))
    for rewards in (REWARDS, REWARDS + np.array([3.0, 0.0, 1.0, -2.0, 0.0, 4.0])):
        second_epoch, _ = advantages_for_mode(
            PROMPTS, rewards, step_weights, credit_mode=credit_mode, num_steps=NUM_STEPS, **trackers,
            temporal_alpha=0.0, adv_clip_max=5.0, window_size=2,
        )
    assert not torch.allclose(second_epoch, group(rewards), atol=1e-3)


def test_group_invalid_inputs_raise():
    with pytest.raises(ValueError, match="per_prompt"):
        advantages_for_mode(
            G_PROMPTS, G_REWARDS, None, credit_mode="sparse", num_steps=G_STEPS, reward_tracker=None,
            step_tracker=None, temporal_alpha=0.0, adv_clip_max=5.0, advantages="grpo",
        )
    with pytest.raises(ValueError, match="reward_tracker"):
        advantages_for_mode(
            G_PROMPTS, G_REWARDS, None, credit_mode="sparse", num_steps=G_STEPS, reward_tracker=None,
            step_tracker=None, temporal_alpha=0.0, adv_clip_max=5.0,
        )


def test_advantage_modes_are_exported_for_the_config():
    assert ADVANTAGE_MODES == ("per_prompt", "group")
