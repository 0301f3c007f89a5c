"""What the benchmark tests share: running `python -m dense_rl.bench`, and reading its output
(results.json complete and finite, PNG plots)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "dense_rl.bench", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def numbers(value):
    """Every number anywhere in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def null_paths(value, path: str = ""):
    """The path ("a/b/0") of every null anywhere in a JSON value."""
    if value is None:
        yield path
    elif isinstance(value, dict):
        for key, v in value.items():
            yield from null_paths(v, f"{path}/{key}" if path else str(key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from null_paths(v, f"{path}/{i}" if path else str(i))


def matches(path: str, pattern: str) -> bool:
    """Whether a null_paths path matches `pattern`, in which * stands for one path component."""
    return re.fullmatch("[^/]*".join(map(re.escape, pattern.split("*"))), path) is not None


def load_results(out: Path, name: str, nulls_allowed: tuple[str, ...] = ()) -> dict:
    """results.json, complete. Report.save writes every NaN or inf as null, so finite numbers alone
    prove nothing: every null must match one of `nulls_allowed` (patterns of null_paths, see
    `matches`), the fields the test expects may have no value."""
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == name and results["complete"] is True
    assert results["settings"]["quick"] is True
    assert len(results["load_average_start"]) == 3 and results["machine"]["cores"] == os.cpu_count()
    assert all(math.isfinite(x) for x in numbers(results))
    unexpected = [path for path in null_paths(results) if not any(matches(path, allowed) for allowed in nulls_allowed)]
    assert unexpected == [], f"null (a NaN or inf when measured) in {unexpected}"
    return results


def assert_png(path: Path, size: tuple[int, int] | None = None) -> None:
    """A PNG image: a plot (more than a few kB), or an image grid of exactly `size` (width, height)."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    if size is None:
        assert len(data) > 5000, path
    else:
        from PIL import Image

        assert Image.open(path).size == size, path
