"""The tiny world's data set: coloured handwritten digits with text captions.

Source images are scikit-learn's 8x8 handwritten digits (1797 images, ships with the package),
upsampled bilinearly to 16x16 and coloured: the stroke in one of six well-separated colours on a
black background. Captions are produced from several templates so that prompts are text, not class
ids ("a red digit seven", "the number 7 in blue", ...). One template is kept out of the RL training
prompts for held-out evaluation; pretraining of the tiny text-to-image model uses all templates.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

# Placeholders: {color} (colour name), {word} (digit word), {num} (numeral 0-9).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {color} digit {word}",
    "the number {num} in {color}",
    "a handwritten {word} in {color}",
    "a {color} handwritten number {num}",
    "{color} {word}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "the digit {word} written in {color}",
)
ALL_TEMPLATES: tuple[str, ...] = TRAIN_TEMPLATES + HELDOUT_TEMPLATES


def caption(digit: int, color: str, template: str) -> str:
    """Fill a caption template with a digit (0-9) and a colour name."""
    digit = int(digit)
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {COLOR_NAMES}")
    return template.format(color=color, word=DIGIT_WORDS[digit], num=str(digit))


def _template_words(template: str) -> list[str]:
    return re.sub(r"\{(color|word|num)\}", " ", template).lower().split()


def _build_vocab() -> tuple[str, ...]:
    words: list[str] = []
    for t in ALL_TEMPLATES:
        words += _template_words(t)
    words += list(COLOR_NAMES) + list(DIGIT_WORDS) + [str(i) for i in range(10)]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)


VOCAB: tuple[str, ...] = _build_vocab()
# The tokenizer adds these to VOCAB ([PAD] must be id 0) and pads every prompt to MAX_LENGTH.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MAX_LENGTH = 16
"""Every word any template, colour or digit can produce (without the tokenizer's special tokens)."""

_DIGIT_TOKENS = {w: i for i, w in enumerate(DIGIT_WORDS)} | {str(i): i for i in range(10)}
_TOKEN_RE = re.compile(r"[a-z]+|[0-9]")


def parse_prompt(prompt: str) -> tuple[int, str]:
    """Recover ``(digit, colour)`` from a caption made by any template (digit word or numeral).

    Raises ``ValueError`` when the prompt does not name exactly one digit and exactly one colour.
    """
    tokens = _TOKEN_RE.findall(str(prompt).lower())
    digits = {_DIGIT_TOKENS[t] for t in tokens if t in _DIGIT_TOKENS}
    colors = {t for t in tokens if t in COLORS}
    if len(digits) != 1 or len(colors) != 1:
        raise ValueError(f"cannot find a digit and a colour in prompt '{prompt}'")
    return digits.pop(), colors.pop()


def prompt_list(split: str = "train") -> list[str]:
    """All digit x colour x template captions of a split ("train", "heldout" or "all").

    Deterministic order: template-major, then digit, then colour.
    """
    templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES, "all": ALL_TEMPLATES}
    if split not in templates:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return [caption(d, c, t) for t in templates[split] for d in range(10) for c in COLOR_NAMES]


def color_tensor(colors: list[str] | tuple[str, ...]) -> torch.Tensor:
    """RGB rows [N,3] for a list of colour names."""
    return torch.tensor([COLORS[c] for c in colors], dtype=torch.float32)


def load_gray_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Grayscale stroke intensity [N,1,size,size] in [0,1] (bilinear upsampling) and labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0).contiguous(), torch.from_numpy(d.target.astype(np.int64))


def source_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of the 1797 source digits into (train_idx, test_idx)."""
    n = 1797
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def colorize(gray: torch.Tensor, colors: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Stroke intensity [N,1,H,W] times a colour per row -> RGB [N,3,H,W] on black."""
    return gray * color_tensor(colors)[:, :, None, None]


def colored_digits(
    size: int = 16,
    seed: int = 0,
    split: str = "all",
    colors: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Coloured digits: ``(images float32 [N,3,size,size] in [0,1], digits int64 [N], colours)``.

    split: "all" (1797 source digits), "train" or "test" (the fixed 80/20 split of
    :func:`source_split`).
    colors: "all" gives every source digit in every colour (N = 6 x sources, source-major);
    "random" gives one colour per source digit drawn with ``seed``.
    """
    gray, digits = load_gray_digits(size)
    if split != "all":
        train_idx, test_idx = source_split()
        if split == "train":
            idx = train_idx
        elif split == "test":
            idx = test_idx
        else:
            raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
        gray, digits = gray[idx], digits[idx]
    n = gray.shape[0]
    if colors == "all":
        names = [c for _ in range(n) for c in COLOR_NAMES]
        gray = gray.repeat_interleave(len(COLOR_NAMES), dim=0)
        digits = digits.repeat_interleave(len(COLOR_NAMES), dim=0)
    elif colors == "random":
        rng = np.random.default_rng(seed)
        names = [COLOR_NAMES[i] for i in rng.integers(0, len(COLOR_NAMES), size=n)]
    else:
        raise ValueError(f"colors must be 'all' or 'random', got {colors!r}")
    images = colorize(gray, names).float().contiguous()
    return images, digits, names
