"""PerPromptStatTracker: global fallback, per-prompt buffers, truncation, [B, T] rows, state round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dense_rl.algo.normalisers import PerPromptStatTracker


def normalise(values, reference):
    reference = np.asarray(reference, dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) - reference.mean()) / (reference.std() + 1e-6)


def test_global_fallback_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=3)
    prompts = ["a", "a", "b", "b"]
    values = np.array([1.0, 3.0, 10.0, 20.0])
    result = tracker.update(prompts, values)
    assert result.dtype == np.float32 and result.shape == (4,)
    # Two rows per prompt < min_count: the whole batch's mean and std.
    np.testing.assert_allclose(result, normalise(values, values), rtol=1e-6)


def test_per_prompt_stats_at_min_count():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=2)
    prompts = ["a", "b", "a", "b"]
    values = np.array([1.0, 10.0, 3.0, 30.0])
    result = tracker.update(prompts, values)
    np.testing.assert_allclose(result[[0, 2]], normalise([1.0, 3.0], [1.0, 3.0]), rtol=1e-6)
    np.testing.assert_allclose(result[[1, 3]], normalise([10.0, 30.0], [10.0, 30.0]), rtol=1e-6)
    np.testing.assert_allclose(result[[0, 2]], [-1.0, 1.0], rtol=1e-5)


def test_buffer_spans_updates_and_truncates_to_buffer_size_rows():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a", "a"], np.array([0.0, 100.0]))
    # The buffer now holds [0, 100, 5] for this row's statistics.
    result = tracker.update(["a"], np.array([5.0]))
    np.testing.assert_allclose(result, normalise([5.0], [0.0, 100.0, 5.0]), rtol=1e-6)
    # Adding two more rows drops the two oldest: the buffer is [5, 7, 9].
    result = tracker.update(["a", "a"], np.array([7.0, 9.0]))
    np.testing.assert_allclose(result, normalise([7.0, 9.0], [5.0, 7.0, 9.0]), rtol=1e-6)
    assert tracker.stats() == {"num_prompts": 1, "mean_buffer_rows": 3.0, "min_buffer_rows": 3, "max_buffer_rows": 3}


def test_step_rewards_rows_are_buffered_whole():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    first = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 9.0]])
    result = tracker.update(["a", "b", "b"], first)
    assert result.shape == (3, 3) and result.dtype == np.float32
    # Prompt a holds one row < min_count: global stats over all 9 values of the batch.
    np.testing.assert_allclose(result[0], normalise(first[0], first), rtol=1e-6)
    # Prompt b holds two rows: stats over all 6 of its values.
    np.testing.assert_allclose(result[1:], normalise(first[1:], first[1:]), rtol=1e-6)
    # One more b row pushes out b's oldest row (a row is a whole trajectory, not a value).
    second = np.array([[2.0, 2.0, 8.0]])
    result = tracker.update(["b"], second)
    np.testing.assert_allclose(result, normalise(second, np.concatenate([first[2], second[0]])), rtol=1e-6)


def test_state_dict_json_round_trip_gives_identical_outputs():
    rng = np.random.default_rng(0)
    prompts = ["cat", "dog", "cat", "bird"]
    tracker = PerPromptStatTracker(buffer_size=5, min_count=2)
    for _ in range(3):
        tracker.update(prompts, rng.normal(size=(4, 6)))
    restored = PerPromptStatTracker(buffer_size=5, min_count=2)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.stats() == tracker.stats()
    next_values = rng.normal(size=(4, 6))
    np.testing.assert_array_equal(restored.update(prompts, next_values), tracker.update(prompts, next_values))


def test_load_state_dict_keeps_configured_buffer_size():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    tracker.update(["a"] * 4, np.arange(4.0))
    smaller = PerPromptStatTracker(buffer_size=2, min_count=1)
    smaller.load_state_dict(tracker.state_dict())
    assert smaller.state_dict()["buffers"]["a"] == [[2.0], [3.0]]  # the most recent rows


def test_invalid_inputs_raise():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    with pytest.raises(ValueError, match="prompts"):
        tracker.update(["a", "b"], np.zeros(3))
    with pytest.raises(ValueError, match=r"non-finite.*\[1\]"):
        tracker.update(["a", "b"], np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        tracker.update(["a"], np.zeros((1, 2, 3)))
    assert tracker.stats()["num_prompts"] == 0  # rejected batches leave no trace
    with pytest.raises(ValueError, match="buffer_size"):
        PerPromptStatTracker(buffer_size=0, min_count=1)
