"""What every benchmark shares: the machine it ran on, its output folder, its JSON and its printed table."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: the machine is shared, so every timing carries them."""
    return [round(x, 2) for x in os.getloadavg()]


def ray_workers_at_normal_priority() -> None:
    """Ray starts its worker processes at niceness 15. On a machine shared with other work that
    starves every actor, while the in-process loop it is compared with runs at niceness 0; the
    benchmarks compare like with like, so the workers of the Ray instances they start run at 0
    (as Ray's own job manager sets for job drivers). Must run before Ray starts."""
    os.environ["RAY_worker_niceness"] = "0"


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "gpu": torch.cuda.is_available(),
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }


def finite_or_none(value):
    """JSON has no NaN/inf: a quantity that could not be measured is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class Report:
    """Collects a benchmark's results and writes them (again) after every piece, so a long run that
    is cut short still leaves what it measured."""

    def __init__(self, name: str, out: str | Path, settings: dict):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = {
            "benchmark": name, "command": " ".join(["python -m dense_rl.bench", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
            "load_average_start": load_average(), "settings": settings, "complete": False,
        }

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def save(self) -> Path:
        self.data["load_average_now"] = load_average()
        path = self.out / "results.json"
        path.write_text(json.dumps(finite_or_none(self.data), indent=1, allow_nan=False))
        return path

    def finish(self) -> Path:
        self.data["complete"] = True
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return self.save()


def table(rows: list[tuple], headers: tuple[str, ...]) -> str:
    """A plain-text table (also valid Markdown), numbers formatted to a few significant digits."""

    def cell(value) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def print_failures(failures: list[str]) -> int:
    """A grid's failed runs, one line each, after its results; the exit status (1 if any failed)."""
    if not failures:
        return 0
    print(f"\n{len(failures)} run(s) failed; rerun the same command to retry them:", file=sys.stderr)
    for line in failures:
        print(f"  {line}", file=sys.stderr)
    return 1
