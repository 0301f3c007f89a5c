"""The shipped tiny reward models, loaded from dense_rl/assets/rewards (real weights, no mocks)."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from dense_rl.models.tiny.data import COLOR_NAMES, caption, load_gray_digits, source_split
from dense_rl.models.tiny.train.rewards import best_variant, colorize_idx, poor_variant
from dense_rl.rewards.tiny import DEFAULT_CLASSIFIER, DEFAULT_PREFERENCE, DigitAlignmentReward, PreferenceReward


@pytest.fixture(scope="module")
def heldout():
    """Held-out source digits (never seen by the reward models), each in a cycling colour."""
    gray, digits = load_gray_digits(16)
    _, test_idx = source_split()
    gray, digits = gray[test_idx], digits[test_idx]
    colors = torch.arange(len(digits)) % len(COLOR_NAMES)
    return gray, digits, colors, colorize_idx(gray, colors)


@pytest.fixture(scope="module")
def alignment():
    return DigitAlignmentReward()


@pytest.fixture(scope="module")
def preference():
    return PreferenceReward()


def test_classifier_accuracy_on_heldout_digits(alignment, heldout):
    _, digits, colors, images = heldout
    digit_probs, color_probs = alignment.predict(images)
    assert digit_probs.shape == (len(digits), 10) and color_probs.shape == (len(digits), 6)
    assert (digit_probs.argmax(1) == digits).float().mean() > 0.95  # measured 0.997
    assert (color_probs.argmax(1) == colors).float().mean() > 0.98  # measured 1.000


def test_alignment_high_for_matching_prompt_low_for_mismatch(alignment, heldout):
    _, digits, colors, images = heldout
    images, digits, colors = images[:120], digits[:120].tolist(), colors[:120].tolist()
    match = [caption(d, COLOR_NAMES[c], "a {color} digit {word}") for d, c in zip(digits, colors)]
    wrong_digit = [caption((d + 3) % 10, COLOR_NAMES[c], "the number {num} in {color}") for d, c in zip(digits, colors)]
    wrong_color = [caption(d, COLOR_NAMES[(c + 2) % 6], "the digit {word} written in {color}") for d, c in zip(digits, colors)]
    r_match, r_digit, r_color = alignment(images, match), alignment(images, wrong_digit), alignment(images, wrong_color)
    # Each template is read as the digit and colour it names: the reward is P(that digit) * P(that colour).
    digit_probs, color_probs = alignment.predict(images)
    rows, d, c = torch.arange(120), torch.tensor(digits), torch.tensor(colors)
    for r, named_digit, named_color in ((r_match, d, c), (r_digit, (d + 3) % 10, c), (r_color, d, (c + 2) % 6)):
        assert r.dtype == torch.float32 and r.shape == (120,) and r.device.type == "cpu"
        torch.testing.assert_close(r, digit_probs[rows, named_digit] * color_probs[rows, named_color])
    assert r_match.mean() > 0.8
    assert r_digit.mean() < 0.1 and r_color.mean() < 0.1
    assert (r_match > r_digit).float().mean() > 0.95 and (r_match > r_color).float().mean() > 0.95


def test_alignment_rejects_prompts_without_digit_and_colour(alignment, heldout):
    images = heldout[3][:2]
    with pytest.raises(ValueError, match="cannot find a digit and a colour"):
        alignment(images, ["a red digit seven", "a photo of a cat"])


def test_preference_prefers_bold_centred_high_contrast(preference, heldout):
    gray, _, colors, _ = heldout
    good = colorize_idx(best_variant(gray), colors)
    bad = colorize_idx(poor_variant(gray), colors)
    raw = colorize_idx(gray, colors)
    s_good, s_bad, s_raw = preference(good, [""] * len(good)), preference(bad, None), preference(raw, None)
    assert s_good.dtype == torch.float32 and s_good.shape == (len(good),)
    assert (s_good > s_bad).float().mean() > 0.95
    # headroom: the best renders beat the raw data (what the base text-to-image model imitates)
    assert (s_good > s_raw).float().mean() > 0.8
    assert s_good.mean() > s_raw.mean() + 1.0


def test_both_rewards_accept_32x32_inputs(alignment, preference, heldout):
    _, digits, colors, images = heldout
    big = F.interpolate(images[:64], size=(32, 32), mode="bilinear", align_corners=False)
    prompts = [caption(d, COLOR_NAMES[c], "a {color} digit {word}") for d, c in zip(digits[:64].tolist(), colors[:64].tolist())]
    r32 = alignment(big, prompts)
    assert r32.shape == (64,) and r32.mean() > 0.7
    p16, p32 = preference(images[:64], prompts), preference(big, prompts)
    assert p32.shape == (64,) and torch.isfinite(p32).all()
    assert torch.corrcoef(torch.stack([p16, p32]))[0, 1] > 0.8


def test_missing_or_corrupt_weights_raise_clear_errors(tmp_path):
    missing = tmp_path / "nowhere" / "digit_classifier.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DigitAlignmentReward(path=str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PreferenceReward(path=missing.with_name("preference.safetensors"))
    corrupt = tmp_path / "preference.safetensors"
    corrupt.write_bytes(b"this is not a safetensors file")
    shutil.copy(DEFAULT_PREFERENCE.with_suffix(".json"), corrupt.with_suffix(".json"))
    with pytest.raises(ValueError, match=str(corrupt)):
        PreferenceReward(path=corrupt)
    # a classifier file given where a preference model is expected
    wrong = tmp_path / "wrong.safetensors"
    shutil.copy(DEFAULT_CLASSIFIER, wrong)
    shutil.copy(DEFAULT_CLASSIFIER.with_suffix(".json"), wrong.with_suffix(".json"))
    with pytest.raises(ValueError, match="expected a PreferenceNet"):
        PreferenceReward(path=wrong)
