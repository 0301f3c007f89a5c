"""`python -m dense_rl.bench <name> --quick`: each benchmark runs end to end and its output is
well-formed (results.json with finite numbers, PNG plots, a printed table). No time is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
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


def load_results(out: Path, name: str) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == name and results["complete"] is True
    assert results["settings"]["quick"] is True
    assert len(results["load_average_start"]) == 3 and results["machine"]["cores"] >= 1
    assert all(math.isfinite(x) for x in numbers(results))
    return results


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_bench_lists_benchmarks_and_rejects_unknown_names():
    listing = subprocess.run([sys.executable, "-m", "dense_rl.bench"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in ("sample-efficiency", "throughput", "scaling"))
    unknown = subprocess.run([sys.executable, "-m", "dense_rl.bench", "speed"], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert unknown.returncode == 2 and "unknown benchmark 'speed'" in unknown.stderr


@pytest.mark.slow
def test_sample_efficiency_quick(tmp_path):
    result = run_bench("sample-efficiency", "--quick", "--out", str(tmp_path))
    results = load_results(tmp_path, "sample-efficiency")
    settings, summary = results["settings"], results["summary"]
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {(m, s) for m in ("ddpo", "uca", "coca") for s in (0, 1)}
    assert set(summary["methods"]) == {"ddpo", "uca", "coca"}
    for method in summary["methods"].values():
        assert method["seeds"] == 2 and len(method["curve_mean"]) == settings["epochs"]
        assert set(method["heldout"]) == {"preference", "digit_alignment"}
    # Same seeds, same first batch: the methods differ only after their first update.
    first = {m: s["curve_mean"][0] for m, s in summary["methods"].items()}
    assert first["ddpo"] == pytest.approx(first["coca"], abs=1e-5) == pytest.approx(first["uca"], abs=1e-5)
    # DDPO reaches its own final mean at the latest at the budget's last point.
    assert summary["methods"]["ddpo"]["samples_to_reach_ddpo_final"] <= summary["samples"][-1]
    assert_png(tmp_path / "reward_vs_samples.png")
    assert "| method" in result.stdout and "DDPO / COCA" in result.stdout


@pytest.mark.slow
def test_throughput_quick(tmp_path):
    result = run_bench("throughput", "--quick", "--out", str(tmp_path))
    results = load_results(tmp_path, "throughput")
    ratios = results["ratios"]
    assert set(ratios) == {
        "coca_over_sparse_epoch_time", "credit_compute_coca_share_of_epoch", "credit_compute_coca_over_sparse",
        "ray_sync_over_in_process_throughput", "async_over_sync_throughput",
        "broadcast_tiny_share_of_ray_epoch", "broadcast_sd15_share_of_tiny_ray_epoch",
        "async_over_sync_reward_gain_per_second",
    }
    # 2 quick epochs: any sign; null (NaN in the report) when sync gained nothing to divide by.
    learning = ratios.pop("async_over_sync_reward_gain_per_second")
    assert learning is None or isinstance(learning, float)
    assert all(value > 0 for value in ratios.values())
    for mode in ("sync", "async"):
        run = results["results"]["ray"][mode]
        assert len(run["reward_mean"]) == len(run["seconds_at_epoch_end"]) == 2
        assert run["learning"]["per_second"] == pytest.approx(
            (run["reward_mean"][1] - run["reward_mean"][0]) / run["seconds_at_epoch_end"][1])
    broadcast = results["results"]["broadcast_and_bytes"]
    # SD 1.5's attention projections with a rank-4 adapter: 797,184 float32 parameters (about 3.2 MB).
    assert broadcast["sd15_rank4"]["parameters"] == 797184 and broadcast["sd15_rank4"]["bytes"] == 4 * 797184
    assert 0 < broadcast["tiny"]["bytes"] < broadcast["sd15_rank4"]["bytes"]
    store = broadcast["object_store"]
    assert store["bytes_per_trajectory"] >= sum(store["field_bytes_per_trajectory"].values())
    assert {"latents", "x0_preds", "log_probs", "images"} <= set(store["field_bytes_per_trajectory"])
    assert_png(tmp_path / "throughput.png")
    assert "Ray sync / in-process" in result.stdout and "async / sync" in result.stdout


@pytest.mark.slow
def test_scaling_quick(tmp_path):
    result = run_bench("scaling", "--quick", "--out", str(tmp_path))
    results = load_results(tmp_path, "scaling")
    assert set(results["measured"]) == {"1", "2"}
    model = results["cost_model"]
    assert set(model["predicted_trajectories_per_second"]) == {"1", "2", "4", "8", "16", "32", "64"}
    predicted = [model["predicted_trajectories_per_second"][n] for n in ("1", "2", "4", "8", "16", "32", "64")]
    assert predicted == sorted(predicted)  # more actors never predicts less throughput
    assert "T(N) = a/N + b + c" in (tmp_path / "cost_model.md").read_text()
    assert_png(tmp_path / "scaling.png")
    assert "| rollout actors" in result.stdout
