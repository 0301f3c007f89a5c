"""Everything a checkpoint holds, who writes it, and how a run resumes from it. One module for both
sides: the learner (rank 0) and the driver import it; it imports neither, nor Ray.

    RUN/checkpoints/<session>/epoch-NNNN/   <session>: from-epoch-<start>-<time>, one per start or resume
        pytorch_lora_weights.safetensors  the LoRA, diffusers' format and LoraConfig      (the learner)
        optimizer.safetensors             AdamW state as tensors + JSON param groups, no pickle (the learner)
        driver_state.json                 epoch, samples seen, both stat trackers, metric history (the driver)
    RUN/latest.json                       the newest complete checkpoint                 (the driver, last)

The learner writes its two files first; the driver writes its state once the learner reports the
epoch, then `latest.json` names the folder, so a crash in between leaves the previous checkpoint
current. Resume (`load_resume_point`, driver side) and `restore_learner` (learner side) read them back.
On restore the optimizer takes the config's `train.*` hyperparameters, not the saved ones, so
`--resume RUN --set train.lr=...` takes effect.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field

import torch

from dense_rl.algo.normalisers import PerPromptStatTracker
from dense_rl.config import Config, RunConfig, TrainConfig
from dense_rl.run.storage import CHECKPOINTS, RunDir

LORA_FILE = "pytorch_lora_weights.safetensors"  # == dense_rl.diffusion.lora.LORA_FILE, the name diffusers looks for
OPTIMIZER_FILE = "optimizer.safetensors"
DRIVER_STATE = "driver_state.json"


# ---------------------------------------------------------------------- names


def checkpoint_name(version: int) -> str:
    """The folder of policy version k inside a session's checkpoint folder: epoch-000k."""
    return f"epoch-{version:04d}"


def checkpoint_version(path: str) -> int:
    """.../epoch-000k -> k."""
    return int(path.rstrip("/").rsplit("/", 1)[-1].removeprefix("epoch-"))


def session_name(start_version: int) -> str:
    """The name of one session of a run (its first start, or a resume from version k), whose checkpoints
    are CHECKPOINTS/<name>/epoch-NNNN: a resumed run never overwrites the checkpoints of an earlier session."""
    return f"from-epoch-{start_version:04d}-{time.strftime('%Y%m%d-%H%M%S')}"


def session_folder(start_version: int) -> str:
    """The checkpoint folder of a new session, relative to the run."""
    return f"{CHECKPOINTS}/{session_name(start_version)}"


def keep_newest(run: RunDir, session: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a session (`session`: its folder relative to the
    run), as Ray Train's CheckpointConfig(num_to_keep) does for the Ray system's learner group."""
    versions = sorted(checkpoint_version(name) for name in run.list_folders(session) if name.startswith("epoch-"))
    for version in versions[:-keep]:
        run.delete_folder(f"{session}/{checkpoint_name(version)}")


def checkpoint_due(version: int, run: RunConfig) -> bool:
    """Whether policy version `version` is saved: every run.save_every versions, and the last."""
    return version % run.save_every == 0 or version == run.num_epochs


# ---------------------------------------------------------------------- driver state


@dataclass
class DriverState:
    """Everything the driver needs to continue a run; saved with each checkpoint."""

    epoch: int = 0  # the next epoch to run == the learner's policy version
    samples_seen: int = 0
    reward_tracker: PerPromptStatTracker | None = None
    step_tracker: PerPromptStatTracker | None = None
    history: list[dict] = field(default_factory=list)


def new_driver_state(config: Config) -> DriverState:
    credit = config.credit
    return DriverState(
        reward_tracker=PerPromptStatTracker(credit.buffer_size, credit.min_count),
        step_tracker=PerPromptStatTracker(credit.buffer_size, credit.min_count),
    )


def driver_state_dict(state: DriverState) -> dict:
    return {
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "reward_tracker": state.reward_tracker.state_dict(),
        "step_tracker": state.step_tracker.state_dict(),
        "history": state.history,
    }


def load_driver_state(saved: dict, config: Config) -> DriverState:
    state = new_driver_state(config)
    state.epoch = saved["epoch"]
    state.samples_seen = saved["samples_seen"]
    state.reward_tracker.load_state_dict(saved["reward_tracker"])
    state.step_tracker.load_state_dict(saved["step_tracker"])
    state.history = saved["history"]
    return state


def complete_checkpoint(run: RunDir, path: str, state: DriverState) -> None:
    """The driver's half of checkpoint `path` (relative to the run), whose learner files are written:
    its state, then latest.json naming it."""
    run.write_json(f"{path}/{DRIVER_STATE}", driver_state_dict(state))
    run.mark_latest(state.epoch, path)


def latest_checkpoint(run: RunDir) -> dict | None:
    """{"epoch": k, "path": "checkpoints/<session>/epoch-000k"} of the newest complete checkpoint, or None."""
    return run.latest_checkpoint()


def load_resume_point(run: RunDir, config: Config) -> tuple[DriverState, dict | None, str | None]:
    """(driver state, LoRA state, checkpoint path) of the newest complete checkpoint, or a fresh state
    and None when the run has none yet."""
    latest = latest_checkpoint(run)
    if latest is None:
        return new_driver_state(config), None, None
    path = latest["path"]
    state = load_driver_state(run.read_json(f"{path}/{DRIVER_STATE}"), config)
    return state, read_lora_bytes(run, f"{path}/{LORA_FILE}"), path


# ---------------------------------------------------------------------- the learner's files


def write_learner_files(folder: RunDir, unet, optimizer: torch.optim.Optimizer) -> None:
    """LoRA (exactly the bytes diffusers' save_lora_weights writes, adapter metadata included) and
    optimizer state into `folder`, each through RunDir (temporary name, then rename)."""
    from dense_rl.diffusion.lora import save_lora  # diffusers: imported only where a LoRA is written or read

    with tempfile.TemporaryDirectory() as scratch:
        folder.write_bytes(LORA_FILE, save_lora(unet, scratch).read_bytes())
    folder.write_tensors(OPTIMIZER_FILE, *optimizer_to_tensors(optimizer))


def restore_learner(folder: RunDir, unet, optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
    """Load a checkpoint's LoRA and optimizer state, then give the optimizer this run's `train.*`
    hyperparameters: load_state_dict brings back the saved param groups, which would silently undo a
    `--set train.lr=...` given on resume."""
    from dense_rl.diffusion.lora import load_lora_state_dict

    load_lora_state_dict(unet, read_lora_bytes(folder, LORA_FILE))
    optimizer.load_state_dict(optimizer_from_tensors(*folder.read_tensors_and_metadata(OPTIMIZER_FILE)))
    apply_optimizer_config(optimizer, train)


def apply_optimizer_config(optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
    """Write the config's AdamW hyperparameters into every param group (the moments stay as loaded)."""
    for group in optimizer.param_groups:
        group["lr"] = train.lr
        group["betas"] = (train.adam_beta1, train.adam_beta2)
        group["weight_decay"] = train.adam_weight_decay
        group["eps"] = train.adam_epsilon


def read_lora_bytes(run: RunDir, relative: str) -> dict[str, torch.Tensor]:
    """dense_rl.diffusion.lora.read_lora_file for any filesystem: diffusers-named tensors -> peft-named state."""
    from dense_rl.diffusion.lora import lora_state_from_diffusers

    return lora_state_from_diffusers(run.read_tensors(relative), source=f"{run.uri}/{relative}")


# ---------------------------------------------------------------------- optimizer state as safetensors


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer's state into tensors plus JSON metadata (no pickle on disk)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"state.{index}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}
