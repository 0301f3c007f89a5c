"""Prompt sets: a text file with one prompt per line, a JSON list of prompts (the format of HPSv2's
benchmark files), or a set shipped with the package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dense_rl import ASSETS

PROMPT_ASSETS = ASSETS / "prompts"


def prompt_file(spec: str) -> Path:
    """"embedded:NAME" -> the shipped file NAME.txt; anything else is a path."""
    if spec.startswith("embedded:"):
        return PROMPT_ASSETS / f"{spec[len('embedded:'):]}.txt"
    return Path(spec)


def load_prompts(spec: str) -> list[str]:
    """Non-empty, stripped lines of the prompt file. Errors name `sample.prompts` and the fix."""
    path = prompt_file(spec)
    if not path.is_file():
        shipped = ", ".join(f"embedded:{p.stem}" for p in sorted(PROMPT_ASSETS.glob("*.txt")))
        raise ValueError(f"sample.prompts: {str(path)!r} does not exist; give a text file or one of {shipped}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"sample.prompts: {path} is not UTF-8 text (byte {error.start}); re-save it as UTF-8") from None
    if path.suffix == ".json":
        lines = _json_prompts(text, path)
    else:
        lines = text.splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"sample.prompts: {path} holds no prompts; write one prompt per line")
    return prompts


def _json_prompts(text: str, path: Path) -> list[str]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"sample.prompts: {path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"sample.prompts: {path} must hold a JSON list of strings, as HPSv2's benchmark files do")
    return values


def choose_prompts(rng: np.random.Generator, prompts: list[str], batch_size: int, samples_per_prompt: int) -> list[str]:
    """`batch_size / samples_per_prompt` prompts drawn with replacement, each repeated, so that the
    per-prompt normaliser sees several samples of the same prompt."""
    picks = rng.integers(len(prompts), size=batch_size // samples_per_prompt)
    return [prompts[i] for i in picks for _ in range(samples_per_prompt)]


def write_tiny_prompt_sets() -> None:
    """Regenerate the embedded tiny model's prompt sets (`python -m dense_rl.training.prompts`)."""
    from dense_rl.models.tiny.data import prompt_list

    PROMPT_ASSETS.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        (PROMPT_ASSETS / f"tiny_{split}.txt").write_text("\n".join(prompt_list(split)) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_tiny_prompt_sets()
