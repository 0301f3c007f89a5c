"""The learner group: a Ray Train TorchTrainer (DDP; gloo on CPU, NCCL on GPU) whose workers run
PPO on the LoRA parameters.

The driver hands each rank its share of an epoch through a per-rank queue. After the update, rank 0
publishes the new LoRA state once (`ray.put`) to every RolloutWorker, writes its checkpoint files
(LoRA, optimizer: dense_rl/checkpoint.py) straight into the run directory, hands that folder to
`ray.train.report`, and tells the driver. `trainer.fit()` blocks, so it runs in a background thread
of the driver.

A learner worker that dies makes Ray Train (FailureConfig) restart the whole group from its last
checkpoint. The new group announces the version it restored (LearnerStarted) and publishes those
weights to the rollouts; the driver then serves the epoch the dead group had taken once more. Work
carries the checkpoint of the version it starts from, so a group that restored an older one catches
up, and one that restored a newer one (it died after saving) only says so again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import RayActorError, RayError
from ray.util.queue import Empty, Queue

from dense_rl.checkpoint import checkpoint_name, checkpoint_version, restore_learner, write_learner_files
from dense_rl.config import Config
from dense_rl.errors import RunFailed
from dense_rl.run_dir import CHECKPOINTS
from dense_rl.seeds import minibatch_rows, update_seed

log = logging.getLogger("dense_rl")


@dataclass
class LearnerResult:
    version: int
    metrics: dict
    checkpoint: str | None  # the checkpoint folder, relative to the run directory, when one was saved
    weights: list | None = None  # [ObjectRef] of the LoRA state of `version`, as published


@dataclass
class LearnerStarted:
    """Rank 0 of a (re)started group: the policy version its weights hold."""

    version: int
    restored: bool  # from Ray Train's checkpoint, i.e. this is a restart after a failure


@dataclass
class Work:
    epoch: int
    pieces: list  # (ObjectRef of Trajectories, row indices in that batch)
    step_advantages: torch.Tensor
    start_checkpoint: str | None  # the checkpoint of version `epoch`, for a group that is not there
    # (ObjectRef of [n, T] log-probs under version `epoch` from RolloutWorker.rescore, the n row indices
    # of this work they belong to): for batches sampled by an older version; empty when there are none.
    proximal: list = dataclasses.field(default_factory=list)


def proximal_fetcher(work: Work):
    """ppo_update's fetch_proximal for this work: the log-probs of the rows asked for, as the rollouts
    computed them, waiting only for the answers that hold those rows; None (then the learner computes
    them) when any is missing: a rollout that held another version, or died."""
    answers: dict[int, torch.Tensor | None] = {}

    def fetch(rows: torch.Tensor) -> torch.Tensor | None:
        found: dict[int, torch.Tensor] = {}
        wanted = set(rows.tolist())
        for index, (ref, rows_of_answer) in enumerate(work.proximal):
            if wanted.isdisjoint(rows_of_answer):
                continue
            if index not in answers:
                try:
                    answers[index] = ray.get(ref)
                except RayError:
                    answers[index] = None
            if answers[index] is None:
                return None
            found.update(zip(rows_of_answer, answers[index]))
        if not wanted <= found.keys():
            return None
        return torch.stack([found[row] for row in rows.tolist()])

    return fetch


def next_work(inbox: Queue) -> Work | None:
    # Short polls: a get left waiting by a worker that died must not outlive it and swallow the item
    # meant for its successor.
    while True:
        try:
            item = inbox.get(block=True, timeout=2.0)
        except Empty:
            continue
        return None if item is None else ray.get(item[0])


def publish(version: int, state: dict, rollout_workers: list) -> list:
    """ray.put once, set on every RolloutWorker and wait, so the next epoch samples on-policy. A dead
    rollout actor is skipped: the driver hands it the newest weights when it is back."""
    weights = ray.put(state)
    for call in [worker.set_weights.remote(version, [weights]) for worker in rollout_workers]:
        try:
            ray.get(call)
        except RayActorError:
            pass
    return [weights]


def rank_shares(rows: list[int], num_ranks: int, rows_per_batch: int, epoch: int) -> tuple[int, list[list]]:
    """Split an epoch's kept rows (ascending) into equal consecutive shares, one per rank: returns the
    share size and, per rank, its pieces [(rollout batch index, row indices in that batch)].

    DDP needs every rank to take the same number of optimizer steps (each one all-reduces), so each
    rank gets len(rows) // num_ranks rows and the last few rows (fewer than the rank count) are left
    out of this update. Equal shares give equal minibatch counts, a partial last one included.
    """
    share = len(rows) // num_ranks
    if share == 0:
        raise RunFailed(f"rewards: epoch {epoch} has {len(rows)} samples with a finite reward, fewer than "
                        f"cluster.num_learner_workers={num_ranks}; check the reward model")
    if share * num_ranks < len(rows):
        log.info("epoch %d: %d of %d samples left out of the update so each of the %d learner ranks trains on %d",
                 epoch, len(rows) - share * num_ranks, len(rows), num_ranks, share)
    shares = []
    for rank in range(num_ranks):
        pieces: dict[int, list[int]] = {}
        for row in rows[rank * share:(rank + 1) * share]:
            pieces.setdefault(row // rows_per_batch, []).append(row % rows_per_batch)
        shares.append(sorted(pieces.items()))
    return share, shares


def ask_for_proximal(shares: list[list], rescore, *, minibatch_size: int, seeds: list[int],
                     first_minibatch_too: bool) -> list[list]:
    """Each rank's Work.proximal for an off-policy epoch, from `rescore([(batch index, rows in it), ...])`.
    A rank trains its minibatches in an order its update seed fixes (seeds.minibatch_rows), and its
    first needs nothing (its own forward is the proximal policy). So each rank asks twice: for its
    second minibatch, which it needs first, then for the rest in one call (more rows a call make the
    rollout's passes efficient); every rank's first ask goes out before any rank's second. The first
    minibatch is in the rest only when later inner epochs train its rows again."""
    asks = []
    for pieces, seed in zip(shares, seeds):
        where = [(batch, row) for batch, rows in pieces for row in rows]  # the rank's row -> (batch, row there)
        minibatches = minibatch_rows(len(where), minibatch_size, seed)
        rest = minibatches[2:] + (minibatches[:1] if first_minibatch_too else [])
        asks.append((where, [torch.cat(group).tolist() for group in (minibatches[1:2], rest) if group]))
    asked: list[list] = [[] for _ in shares]
    for position in range(2):
        for rank, (where, groups) in enumerate(asks):
            if position < len(groups):
                rows = groups[position]
                by_batch: dict[int, list[int]] = {}  # grouped by rollout batch, the answer's row order
                for row in rows:
                    by_batch.setdefault(where[row][0], []).append(row)
                ordered = [row for rows_of_batch in by_batch.values() for row in rows_of_batch]
                asked[rank].append((rescore([(batch, [where[row][1] for row in rows_of_batch])
                                             for batch, rows_of_batch in by_batch.items()]), ordered))
    return asked


def learner_loop(loop_config: dict) -> None:
    """Runs on every learner worker."""
    import ray.train
    import ray.train.torch

    from dense_rl import chaos, metrics
    from dense_rl.diffusion.pipeline import denoiser
    from dense_rl.diffusion.trajectories import Trajectories
    from dense_rl.lora import lora_state_dict
    from dense_rl.loop import build_policy
    from dense_rl.roles import use_threads
    from dense_rl.run_dir import RunDir
    from dense_rl.update import ignore_frozen_in_ddp, make_grad_scaler, make_optimizer, ppo_update

    config: Config = loop_config["config"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    use_threads(config.cluster.threads("learner"))
    device = "cuda" if config.cluster.learner_gpus > 0 else "cpu"
    policy_config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=device))

    pipe, params = build_policy(policy_config)
    model = denoiser(pipe)  # the UNet or flow transformer that carries the LoRA adapter
    optimizer = make_optimizer(params, config.train)
    grad_scaler = make_grad_scaler(model)  # float16 only; its scale carries over between epochs
    run = RunDir(loop_config["run_uri"])

    # Restore: Ray Train's own checkpoint after a worker failure, else the run's resume point; the
    # optimizer keeps this session's train.* values (a resume may change them).
    def restore(folder: RunDir) -> None:
        restore_learner(folder, model, optimizer, config.train)

    version, saved = loop_config["start_version"], loop_config["resume_from"]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure (FailureConfig)
        with checkpoint.as_directory() as folder:
            restore(RunDir(folder))
        version = checkpoint_version(checkpoint.path)
        saved = f"{loop_config['checkpoint_prefix']}/{checkpoint_name(version)}"
    elif saved is not None:
        restore(run.child(saved))

    if world_size > 1:
        ignore_frozen_in_ddp(model)
        trained = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    else:
        trained = model
    train_config = dataclasses.replace(config.train, batch_size=config.train.batch_size // world_size)
    inbox: Queue = loop_config["inboxes"][rank]
    outbox: Queue = loop_config["outbox"]
    rollout_workers = loop_config["rollout_workers"]
    if rank == 0:
        if checkpoint is not None:  # the rollouts get the restored weights
            publish(version, lora_state_dict(model), rollout_workers)
        outbox.put(LearnerStarted(version, restored=checkpoint is not None))

    while True:
        work: Work | None = next_work(inbox)
        if work is None:
            return
        epoch, pieces, step_advantages = work.epoch, work.pieces, work.step_advantages
        if epoch < version:  # served again, but this group restored it already done: say so again
            if rank == 0 and epoch == version - 1:
                weights = publish(version, lora_state_dict(model), rollout_workers)
                outbox.put(LearnerResult(version, {}, saved if saved and checkpoint_version(saved) == version else None,
                                         weights))
            continue
        if epoch > version:  # restored an older checkpoint than the epoch needs: start from the newer one
            if work.start_checkpoint is None:
                raise RuntimeError(f"the learner holds version {version} but epoch {epoch} needs its own; "
                                   "no checkpoint of it (run.save_every > 1): resume the run with --resume")
            restore(run.child(work.start_checkpoint))
            version = epoch
        trajectories = Trajectories.concat([ray.get(ref).select(rows) for ref, rows in pieces])
        started = time.perf_counter()
        info = ppo_update(
            trained, pipe.scheduler, optimizer, params, trajectories, step_advantages, train_config,
            eta=config.sample.eta, noise_level=config.sample.sde_noise_level, guidance_scale=config.sample.guidance_scale,
            generator=torch.Generator().manual_seed(update_seed(config.run.seed, epoch, rank)),
            learner_version=version, grad_scaler=grad_scaler, fetch_proximal=proximal_fetcher(work),
        )
        info["step_seconds"] = time.perf_counter() - started
        metrics.record_learner_update(rank, info, info["step_seconds"])
        chaos.strike("learner", epoch, rank=rank)  # tests: a worker dies with the epoch taken, not finished
        version = epoch + 1
        save = version % config.run.save_every == 0 or version == config.run.num_epochs
        weights = None
        if rank == 0:
            started, state = time.perf_counter(), lora_state_dict(model)
            weights = publish(version, state, rollout_workers)
            info["broadcast_seconds"] = time.perf_counter() - started
            metrics.record_weight_broadcast(rank, version, info["broadcast_seconds"],
                                            sum(t.numel() * t.element_size() for t in state.values()))
        # Every rank reports (it is a barrier); only rank 0 attaches the checkpoint.
        if save and rank == 0:
            folder_name = checkpoint_name(version)
            # Written in place through RunDir (temporary name, then rename: no file is ever seen half
            # written), then handed to Ray Train as a checkpoint it needs not copy.
            write_learner_files(run.child(f"{loop_config['checkpoint_prefix']}/{folder_name}"), model, optimizer)
            storage = ray.train.get_context().get_storage()
            checkpoint_in_place = ray.train.Checkpoint(f"{storage.experiment_fs_path}/{folder_name}",
                                                       filesystem=storage.storage_filesystem)
            ray.train.report(info, checkpoint=checkpoint_in_place, checkpoint_dir_name=folder_name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        else:
            ray.train.report(info)
        if rank == 0:
            if save:
                saved = f"{loop_config['checkpoint_prefix']}/{checkpoint_name(version)}"
            outbox.put(LearnerResult(version, info, saved if save else None, weights))


class LearnerGroup:
    """The driver's handle on the learner: submit an epoch, wait for its result, close."""

    def __init__(self, config: Config, rollout_workers: list, run_uri: str, start_version: int,
                 resume_from: str | None):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cluster = config.cluster
        self.num_workers = cluster.num_learner_workers
        self.config = config
        self.rows_per_batch = config.sample.batch_size  # rows of each rollout batch
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
                "rollout_workers": rollout_workers, "run_uri": run_uri, "resume_from": resume_from,
                "start_version": start_version, "checkpoint_prefix": f"{CHECKPOINTS}/{fit_name}",
            },
            scaling_config=ScalingConfig(
                num_workers=self.num_workers, use_gpu=cluster.learner_gpus > 0, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=fit_name, storage_path=f"{run_uri.rstrip('/')}/{CHECKPOINTS}",
                failure_config=FailureConfig(max_failures=cluster.learner_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=None),
            ),
        )
        self.error: BaseException | None = None
        self.starts = 0
        self.served: list[Work] | None = None  # the epoch the group holds now, to serve again after a restart
        self.start_point = (start_version, resume_from)  # the newest checkpoint: (version, folder)
        self.thread = threading.Thread(target=self._fit, name="learner-fit", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as error:  # surfaced to the driver in wait()
            self.error = error

    def submit(self, epoch: int, trajectory_refs: list, step_advantages: torch.Tensor, rows: list[int],
               rescore=None) -> None:
        """Hand each rank its equal share of the rows to train on (`rows`: ascending indices into the
        epoch, those with a finite reward; `step_advantages`: one row each), as (ObjectRef, row indices).
        `rescore([(batch index, rows), ...])`: the ObjectRef of those rows' proximal log-probs
        (Driver.rescore), for an epoch sampled by an older policy."""
        share, shares = rank_shares(rows, self.num_workers, self.rows_per_batch, epoch)
        version, folder = self.start_point
        start_checkpoint = folder if version == epoch else None
        proximal = [[] for _ in shares]
        if rescore is not None:
            train = self.config.train
            proximal = ask_for_proximal(shares, rescore, minibatch_size=train.batch_size // self.num_workers,
                                        seeds=[update_seed(self.config.run.seed, epoch, rank) for rank in range(len(shares))],
                                        first_minibatch_too=train.num_inner_epochs > 1)
        self.served = []
        for rank, pieces in enumerate(shares):
            advantages = step_advantages[rank * share:(rank + 1) * share].clone()
            self.served.append(Work(epoch, [(trajectory_refs[batch], local) for batch, local in pieces], advantages,
                                    start_checkpoint, proximal[rank]))
        self._serve()

    def _serve(self) -> None:
        # Each Work goes in as an object reference the queue actor never opens: unpickling the Work
        # itself would make every queue actor import torch and this module (seconds of CPU each).
        for inbox, work in zip(self.inboxes, self.served):
            inbox.put([ray.put(work)])

    def _started(self, message: LearnerStarted, epoch: int) -> None:
        self.starts += 1
        if self.starts == 1 and not message.restored:
            return
        log.warning("learner group restarted from its checkpoint of version %d (Ray Train FailureConfig); "
                    "serving epoch %d to it again", message.version, epoch)
        if self.served is not None and self.served[0].epoch == epoch:
            self._serve()

    def wait(self, epoch: int, poll_seconds: float = 1.0) -> LearnerResult:
        while True:
            if self.error is not None:
                raise RuntimeError(f"the learner group failed: {self.error}") from self.error
            try:
                message = self.outbox.get(block=True, timeout=poll_seconds)
            except Empty:
                if not self.thread.is_alive() and self.error is None:
                    raise RuntimeError("the learner group stopped before finishing the epoch")
                continue
            if isinstance(message, LearnerStarted):
                self._started(message, epoch)
            elif message.version == epoch + 1:  # older versions: answers to an epoch served twice
                if message.checkpoint is not None:
                    self.start_point = (message.version, message.checkpoint)
                return message

    def close(self) -> None:
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except Exception:  # the queue actor is already gone when Ray is shutting down
                pass
        self.thread.join(timeout=60)
