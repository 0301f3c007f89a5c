"""Image monitors against images whose statistics are known by hand."""

import pytest
import torch

from dense_rl.training.monitors import image_monitors, monitor_values


def solid(rgb, count=1, size=8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(count, 3, size, size).clone()


def test_brightness_saturation_and_contrast_of_known_images():
    black, white, red, grey = solid([0, 0, 0]), solid([1, 1, 1]), solid([1, 0, 0]), solid([0.5, 0.5, 0.5])
    values = monitor_values(torch.cat([black, white, red, grey]), ["a", "b", "c", "d"])
    torch.testing.assert_close(values["image_brightness"], torch.tensor([0.0, 1.0, 0.299, 0.5]))
    torch.testing.assert_close(values["image_saturation"], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # black: 0, not NaN
    torch.testing.assert_close(values["image_contrast"], torch.zeros(4))  # flat images
    checkers = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 2  # half black, half white
    board = checkers.float().expand(1, 3, 8, 8)
    assert monitor_values(board, ["e"])["image_contrast"].item() == pytest.approx(0.5)
    assert "image_diversity" not in values  # no prompt sampled twice


def test_diversity_is_the_rms_distance_between_samples_of_one_prompt():
    black, grey, white = solid([0, 0, 0]), solid([0.5, 0.5, 0.5]), solid([1, 1, 1])
    # Prompt a: black and white (RMS distance 1); prompt b: two identical greys (0); c sampled once: no pair.
    values = monitor_values(torch.cat([black, white, grey, grey, black]), ["a", "a", "b", "b", "c"])
    torch.testing.assert_close(values["image_diversity"], torch.tensor([1.0, 0.0]))
    # Three samples: pairs (0, 0.5), (0, 1), (0.5, 1) -> mean 2/3.
    three = monitor_values(torch.cat([black, grey, white]), ["p"] * 3)["image_diversity"]
    torch.testing.assert_close(three, torch.tensor([(0.5 + 1.0 + 0.5) / 3]))


def test_uint8_images_give_the_same_statistics_as_their_floats():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    as_uint8 = (images * 255).round().to(torch.uint8)
    floats = image_monitors(as_uint8.float() / 255, ["a", "a", "b", "b"])
    assert image_monitors(as_uint8, ["a", "a", "b", "b"]) == pytest.approx(floats)


def test_an_epoch_averages_diversity_over_the_batches_that_sampled_a_prompt_twice():
    """With one sample per prompt, a batch has image_diversity only where prompts happened to repeat
    in it (the peer workload cycles 45 prompts through batches of 8): the epoch's row averages each
    monitor over the batches that have it, and a batch without it does not fail the epoch."""
    import types

    from dense_rl.run.records import epoch_metrics
    from dense_rl.training.scoring import ScoredBatch, Scores

    black, white, grey = solid([0, 0, 0]), solid([1, 1, 1]), solid([0.5, 0.5, 0.5])
    pairs = (torch.cat([black, white]), ["a", "a"])  # diversity 1
    singles = (torch.cat([grey, white]), ["b", "c"])  # no prompt twice: no diversity
    batches = [ScoredBatch(prompts, 1, Scores(torch.zeros(2), {}, None, 0), images[:1], image_monitors(images, prompts))
               for images, prompts in (singles, pairs)]
    assert "image_diversity" not in batches[0].monitors
    row = epoch_metrics(0, types.SimpleNamespace(samples_seen=4), batches, {}, {}, timings={"sample": 1.0})
    assert row["image_diversity"] == pytest.approx(1.0)
    assert row["image_brightness"] == pytest.approx((0.5 + 1.0 + 0.0 + 1.0) / 4)
