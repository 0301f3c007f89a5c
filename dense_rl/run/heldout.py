"""What the held-out evaluation writes in the run directory, and the base model's scores kept across runs.

    RUN/heldout.parquet   one row per (evaluation, reward or monitor): epoch, policy_version, samples,
                          reward, mean, std; policy version 0 is the base model
    RUN/best.json         the checkpoint with the highest held-out `trained` reward among those that
                          satisfy every guard: checkpoint (a copy under checkpoints/best/, which
                          checkpoint retention never deletes), policy_version, epoch, scores
    OUTPUT/.heldout-base/<key>.json   the base model's rows, for every run of the same model, held-out
                          set, sampler and rewards (run.output_dir: beside the runs)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow.fs as pafs

from dense_rl.config import Config
from dense_rl.run.storage import CHECKPOINTS, RunDir

HELDOUT_TABLE = "heldout.parquet"
BEST = "best.json"
BEST_FOLDER = f"{CHECKPOINTS}/best"
BASE_CACHE = ".heldout-base"


def read_heldout(run: RunDir) -> list[dict]:
    return run.read_table(HELDOUT_TABLE) if run.exists(HELDOUT_TABLE) else []


def append_heldout(run: RunDir, rows: list[dict]) -> None:
    """Add one evaluation's rows; an evaluation of the same policy version written before (a resumed run
    evaluating again) is replaced."""
    versions = {row["policy_version"] for row in rows}
    kept = [row for row in read_heldout(run) if row["policy_version"] not in versions]
    run.write_table(HELDOUT_TABLE, sorted(kept + rows, key=lambda row: (row["policy_version"], row["reward"])))


def base_cache_key(config: Config, prompts: list[str]) -> str:
    """What the base model's held-out scores depend on: the model, the held-out `prompts` and their
    sampler, and the rewards (the trained ones with their weights, for `trained`)."""
    evaluation = dataclasses.asdict(config.evaluation)
    evaluation.pop("every_epochs")
    described = {"model": dataclasses.asdict(config.model), "evaluation": evaluation, "prompts": prompts,
                 "sample": dataclasses.asdict(config.sample), "rewards": [dataclasses.asdict(spec) for spec in config.rewards]}
    described["sample"].pop("prompts")
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def cached_base(config: Config, prompts: list[str]) -> list[dict] | None:
    store = RunDir(config.run.output_dir)
    name = f"{BASE_CACHE}/{base_cache_key(config, prompts)}.json"
    return store.read_json(name) if store.exists(name) else None


def cache_base(config: Config, prompts: list[str], rows: list[dict]) -> None:
    RunDir(config.run.output_dir).write_json(f"{BASE_CACHE}/{base_cache_key(config, prompts)}.json", rows)


def read_best(run: RunDir) -> dict | None:
    return run.read_json(BEST) if run.exists(BEST) else None


def mark_best(run: RunDir, checkpoint: str, *, policy_version: int, epoch: int, scores: dict[str, float]) -> str:
    """Copy checkpoint `checkpoint` (relative to the run) to checkpoints/best/ and name the copy in
    best.json; returns the copy's folder. The copy is written first and best.json last, so best.json
    always names a whole checkpoint."""
    folder = f"{BEST_FOLDER}/{checkpoint.rstrip('/').rsplit('/', 1)[-1]}"
    previous = read_best(run)
    run.fs.create_dir(run.path(folder), recursive=True)
    pafs.copy_files(run.path(checkpoint), run.path(folder), source_filesystem=run.fs, destination_filesystem=run.fs)
    run.write_json(BEST, {"checkpoint": folder, "policy_version": policy_version, "epoch": epoch, "scores": scores})
    if previous is not None and previous["checkpoint"] != folder and run.exists(previous["checkpoint"]):
        run.delete_folder(previous["checkpoint"])
    return folder
