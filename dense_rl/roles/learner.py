"""The learner group: a Ray Train TorchTrainer (DDP; gloo on CPU, NCCL on GPU) whose workers run
PPO on the LoRA parameters.

The driver hands each rank its share of an epoch through a per-rank queue. After the update, rank 0
publishes the new LoRA state once (`ray.put`) to every RolloutWorker, saves a checkpoint through
`ray.train.report` straight into the run directory, and tells the driver. `trainer.fit()` blocks, so
it runs in a background thread of the driver.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray.util.queue import Empty, Queue

from dense_rl.config import Config
from dense_rl.run_dir import CHECKPOINTS

OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class LearnerResult:
    version: int
    metrics: dict
    checkpoint: str | None  # the checkpoint folder, relative to the run directory, when one was saved


def update_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a rank's minibatch and timestep shuffles in one epoch (no RNG state to checkpoint)."""
    return int(np.random.SeedSequence([seed, epoch, rank, 1]).generate_state(1)[0])


def learner_loop(loop_config: dict) -> None:
    """Runs on every learner worker."""
    import ray.train
    import ray.train.torch

    from dense_rl import metrics
    from dense_rl.diffusion.sampler import Trajectories
    from dense_rl.lora import LORA_FILE, load_lora_state_dict, lora_state_dict, save_lora
    from dense_rl.loop import build_policy
    from dense_rl.roles.rollout import use_actor_cpus
    from dense_rl.run_dir import RunDir, optimizer_from_tensors, optimizer_to_tensors
    from dense_rl.run_record import read_lora_bytes
    from dense_rl.update import make_optimizer, ppo_update

    config: Config = loop_config["config"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    use_actor_cpus(config.cluster.learner_cpus)
    device = "cuda" if config.cluster.learner_gpus > 0 else "cpu"
    policy_config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=device))

    pipe, params = build_policy(policy_config)
    optimizer = make_optimizer(params, config.train)
    run = RunDir(loop_config["run_uri"])

    # Restore: Ray Train's own checkpoint after a worker failure, else the run's resume point.
    def restore(folder: RunDir) -> None:
        load_lora_state_dict(pipe.unet, read_lora_bytes(folder, LORA_FILE))
        optimizer.load_state_dict(optimizer_from_tensors(*folder.read_tensors_and_metadata(OPTIMIZER_FILE)))

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore(RunDir(folder))
    elif loop_config["resume_from"] is not None:
        restore(run.child(loop_config["resume_from"]))

    unet = ray.train.torch.prepare_model(pipe.unet, parallel_strategy_kwargs={"find_unused_parameters": False}) \
        if world_size > 1 else pipe.unet
    train_config = dataclasses.replace(config.train, batch_size=config.train.batch_size // world_size)
    inbox: Queue = loop_config["inboxes"][rank]
    outbox: Queue = loop_config["outbox"]
    rollout_workers = loop_config["rollout_workers"]

    while True:
        work = inbox.get(block=True)
        if work is None:
            return
        epoch, pieces, step_advantages = work
        trajectories = Trajectories.concat([ray.get(ref).select(rows) for ref, rows in pieces])
        started = time.perf_counter()
        info = ppo_update(
            unet, pipe.scheduler, optimizer, params, trajectories, step_advantages, train_config,
            eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
            generator=torch.Generator().manual_seed(update_seed(config.run.seed, epoch, rank)),
        )
        info["step_seconds"] = time.perf_counter() - started
        metrics.record_learner_update(rank, info, info["step_seconds"])
        version = epoch + 1
        save = version % config.run.save_every == 0 or version == config.run.num_epochs
        if rank == 0:
            # Publish once; wait until every worker holds it so the next epoch samples on-policy.
            started, state = time.perf_counter(), lora_state_dict(pipe.unet)
            weights = ray.put(state)
            ray.get([worker.set_weights.remote(version, [weights]) for worker in rollout_workers])
            info["broadcast_seconds"] = time.perf_counter() - started
            metrics.record_weight_broadcast(rank, version, info["broadcast_seconds"],
                                            sum(t.numel() * t.element_size() for t in state.values()))
        # Every rank reports (it is a barrier); only rank 0 attaches the checkpoint.
        if save and rank == 0:
            folder_name = f"epoch-{version:04d}"
            with tempfile.TemporaryDirectory() as folder:
                save_lora(pipe.unet, folder)
                tensors, metadata = optimizer_to_tensors(optimizer)
                RunDir(folder).write_tensors(OPTIMIZER_FILE, tensors, metadata)
                ray.train.report(info, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=folder_name)
        else:
            ray.train.report(info)
        if rank == 0:
            saved = f"{loop_config['checkpoint_prefix']}/epoch-{version:04d}" if save else None
            outbox.put(LearnerResult(version, info, saved))


class LearnerGroup:
    """The driver's handle on the learner: submit an epoch, wait for its result, close."""

    def __init__(self, config: Config, rollout_workers: list, run_uri: str, start_version: int,
                 resume_from: str | None):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cluster = config.cluster
        self.num_workers = cluster.num_learner_workers
        self.inboxes = [Queue(actor_options={"num_cpus": 0}) for _ in range(self.num_workers)]
        self.outbox = Queue(actor_options={"num_cpus": 0})
        resources = {"CPU": cluster.learner_cpus, **cluster.custom_resources("learner")}
        if cluster.learner_gpus > 0:
            resources["GPU"] = cluster.learner_gpus
        # A fresh name per fit: Ray Train resumes a same-named run from *its* newest checkpoint, which
        # can be ahead of the driver's (the driver may have died before recording it).
        fit_name = f"from-epoch-{start_version:04d}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.trainer = TorchTrainer(
            learner_loop,
            train_loop_config={
                "config": config, "inboxes": self.inboxes, "outbox": self.outbox,
                "rollout_workers": rollout_workers, "run_uri": run_uri, "resume_from": resume_from, "checkpoint_prefix": f"{CHECKPOINTS}/{fit_name}",
            },
            scaling_config=ScalingConfig(
                num_workers=self.num_workers, use_gpu=cluster.learner_gpus > 0, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=fit_name, storage_path=f"{run_uri.rstrip('/')}/{CHECKPOINTS}",
                failure_config=FailureConfig(max_failures=2),
                checkpoint_config=CheckpointConfig(num_to_keep=None),
            ),
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name="learner-fit", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as error:  # surfaced to the driver in wait()
            self.error = error

    def submit(self, epoch: int, trajectory_refs: list, step_advantages: torch.Tensor) -> None:
        """Split the epoch's rows evenly across ranks, as (ObjectRef, row slice) pieces."""
        total = step_advantages.shape[0]
        batch_size = total // len(trajectory_refs)  # every rollout batch has the same size
        share = total // self.num_workers
        for rank in range(self.num_workers):
            start, stop = rank * share, (rank + 1) * share
            pieces = []
            for index, ref in enumerate(trajectory_refs):
                first = index * batch_size
                lo, hi = max(start, first), min(stop, first + batch_size)
                if lo < hi:
                    pieces.append((ref, slice(lo - first, hi - first)))
            self.inboxes[rank].put((epoch, pieces, step_advantages[start:stop].clone()))

    def wait(self, epoch: int, poll_seconds: float = 1.0) -> LearnerResult:
        while True:
            if self.error is not None:
                raise RuntimeError(f"the learner group failed: {self.error}") from self.error
            try:
                result: LearnerResult = self.outbox.get(block=True, timeout=poll_seconds)
            except Empty:
                if not self.thread.is_alive() and self.error is None:
                    raise RuntimeError("the learner group stopped before finishing the epoch")
                continue
            if result.version == epoch + 1:
                return result

    def close(self) -> None:
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except Exception:  # the queue actor is already gone when Ray is shutting down
                pass
        self.thread.join(timeout=60)
