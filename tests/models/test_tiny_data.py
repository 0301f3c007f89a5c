"""The tiny world's captioned coloured-digit data (no models involved)."""

import pytest
import torch

from dense_rl.models.tiny.data import (
    ALL_TEMPLATES,
    COLORS,
    DIGIT_WORDS,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    VOCAB,
    caption,
    colored_digits,
    parse_prompt,
    prompt_list,
    source_split,
)


def test_colours_and_words():
    assert set(COLORS) == {"red", "green", "blue", "yellow", "cyan", "magenta"}
    assert len(DIGIT_WORDS) == 10 and DIGIT_WORDS[7] == "seven"
    assert HELDOUT_TEMPLATES and not set(HELDOUT_TEMPLATES) & set(TRAIN_TEMPLATES)


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_parse_prompt_round_trips_every_caption(template):
    for d in range(10):
        for c in COLORS:
            text = caption(d, c, template)
            assert parse_prompt(text) == (d, c)
            assert parse_prompt(text.upper()) == (d, c)
            # every word of every caption is in the tokenizer vocabulary
            assert all(w in VOCAB for w in text.split()), text


def test_examples_from_the_brief():
    assert parse_prompt("a red digit seven") == (7, "red")
    assert parse_prompt("the number 7 in blue") == (7, "blue")
    assert parse_prompt("a handwritten five in green") == (5, "green")
    assert parse_prompt("the digit two written in cyan") == (2, "cyan")


@pytest.mark.parametrize("bad", ["a red digit", "the number seven", "a purple seven", "", "a red seven and a blue two"])
def test_bad_prompt_raises_naming_the_prompt(bad):
    with pytest.raises(ValueError, match="cannot find a digit and a colour") as err:
        parse_prompt(bad)
    assert f"'{bad}'" in str(err.value)


def test_prompt_lists():
    train, heldout = prompt_list("train"), prompt_list("heldout")
    assert len(train) == 60 * len(TRAIN_TEMPLATES) and len(heldout) == 60 * len(HELDOUT_TEMPLATES)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    assert train == prompt_list("train")  # deterministic
    with pytest.raises(ValueError):
        prompt_list("validation")


def test_colored_digits_shapes_and_ranges():
    images, digits, colors = colored_digits(size=16, seed=0)
    n = images.shape[0]
    assert images.shape == (n, 3, 16, 16) and images.dtype == torch.float32
    assert digits.shape == (n,) and digits.dtype == torch.int64 and len(colors) == n
    assert n == 1797 * 6
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.9
    assert set(digits.tolist()) == set(range(10)) and set(colors) == set(COLORS)
    # the stroke is in the named colour: channels that are off in the colour stay black
    for i in range(0, n, 997):
        off = torch.tensor(COLORS[colors[i]]) == 0
        assert images[i][off].abs().max() == 0
        assert images[i][~off].max() > 0.5

    small, d2, c2 = colored_digits(size=8, seed=3, split="test", colors="random")
    _, test_idx = source_split()
    assert small.shape == (len(test_idx), 3, 8, 8) and len(c2) == len(test_idx)
    assert colored_digits(size=8, seed=3, split="test", colors="random")[2] == c2


def test_source_split_is_disjoint_and_complete():
    tr, te = source_split()
    assert not set(tr) & set(te) and len(tr) + len(te) == 1797
