"""The learner group: a Ray Train `TorchTrainer` whose `cluster.num_learner_workers` workers run PPO on
the LoRA parameters under DDP (gloo on CPU, NCCL on GPU; DDP synchronises the LoRA only).

Each epoch the driver posts every rank's share on a `LearnerBoard` (an actor holding ObjectRefs of the
rows, never the tensors) and waits there for rank 0's result. Each worker (`learner_loop`) takes its
share, trains, and reports to Ray Train; rank 0 then publishes the new LoRA state once (`ray.put`) to
every RolloutWorker and, when a checkpoint is due, hands Ray Train the folder to persist.

Ray Train does the rest:
- `ScalingConfig` places the workers (`cluster.learner_*`, the layout's CPUs, a custom resource);
- `FailureConfig(max_failures=cluster.learner_failures)` restarts the whole group when a worker dies;
  the new workers restore Ray Train's newest checkpoint (`ray.train.get_checkpoint`), rank 0 publishes
  those weights to the rollouts, and the board serves the epoch again;
- `RunConfig(storage_path=RUN/checkpoints, name=<session>)` persists each checkpoint into the run
  directory (a local path or a URI) as `checkpoints/<session>/epoch-NNNN`, and `CheckpointConfig(num_to_keep=
  checkpoint.keep)` deletes all but the newest of them; the driver completes each with its own state
  and `latest.json` (dense_rl/run/checkpoints.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import threading
import time

import ray
import torch
from ray.exceptions import RayActorError, RayError

from dense_rl.config import Config, RunFailed
from dense_rl.run.checkpoints import checkpoint_due, checkpoint_name, checkpoint_version, restore_learner, session_name
from dense_rl.run.storage import CHECKPOINTS
from dense_rl.system.errors import describe
from dense_rl.system.messages import LearnerResult, Work
from dense_rl.training.seeds import minibatch_rows, update_seed

log = logging.getLogger("dense_rl")


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




@ray.remote(num_cpus=0)
class LearnerBoard:
    """Where the driver posts each epoch's work for the learner ranks, and rank 0 the epoch's result.

    It holds ObjectRefs and plain values only and never opens them (so it imports no torch): a rank
    reads its share of the trajectories through the object store. It outlives restarts of the worker
    group, so a restarted group takes the epoch the failed one had taken. An async actor: a call that
    waits (for work, for a result) does not hold up the others."""

    def __init__(self):
        self.work: tuple[int, list] | None = None  # (epoch, [ObjectRef of each rank's Work])
        self.results: dict[int, dict] = {}  # policy version -> rank 0's result
        self.starts: list[tuple[int, bool]] = []  # (policy version, from a checkpoint) of each group start
        self.failure: str | None = None
        self.closed = False
        self.changed = asyncio.Condition()

    async def _update(self, change) -> None:
        async with self.changed:
            change()
            self.changed.notify_all()

    async def _until(self, condition) -> None:
        async with self.changed:
            await self.changed.wait_for(condition)

    async def post_work(self, epoch: int, refs: list) -> None:
        await self._update(lambda: setattr(self, "work", (epoch, refs)))

    async def take_work(self, epoch: int, rank: int) -> list | None:
        """[ObjectRef of rank `rank`'s Work] of `epoch` once posted; None when the run is over."""
        await self._until(lambda: self.closed or (self.work is not None and self.work[0] == epoch))
        return None if self.closed else [self.work[1][rank]]

    async def started(self, version: int, from_checkpoint: bool) -> tuple[int, int | None]:
        """A group (rank 0) starts at policy `version`: returns how many groups have started, this one
        included, and the epoch posted now (None before the first)."""
        await self._update(lambda: self.starts.append((version, from_checkpoint)))
        return len(self.starts), None if self.work is None else self.work[0]

    def start_log(self) -> list[tuple[int, bool]]:
        return list(self.starts)

    async def post_result(self, version: int, result: dict) -> None:
        await self._update(lambda: self.results.__setitem__(version, result))

    async def result(self, epoch: int) -> dict:
        """Rank 0's result of `epoch` (policy version epoch + 1), or {"failure": one line} when the group
        cannot go on."""
        await self._until(lambda: self.failure is not None or epoch + 1 in self.results)
        return {"failure": self.failure} if self.failure is not None else self.results.pop(epoch + 1)

    async def fail(self, message: str) -> None:
        await self._update(lambda: setattr(self, "failure", message))

    def is_ending(self) -> bool:
        """The driver closed the board, or a failure no restart mends was posted: the run is ending."""
        return self.closed or self.failure is not None

    async def close(self) -> None:
        await self._update(lambda: setattr(self, "closed", True))


def learner_loop(loop_config: dict) -> None:
    """What every Ray Train worker runs: build the policy, restore the newest checkpoint (Ray Train's after
    a restart, else the session's start point), wrap it in DDP, then train each epoch the board serves."""
    import ray.train
    import ray.train.torch

    from dense_rl.diffusion.lora import lora_state_dict
    from dense_rl.diffusion.pipeline import build_policy, denoiser
    from dense_rl.diffusion.trajectories import Trajectories
    from dense_rl.run.checkpoints import write_learner_files
    from dense_rl.run.storage import RunDir
    from dense_rl.system import faults, telemetry
    from dense_rl.system.roles import use_threads
    from dense_rl.training.recipe import update_policy
    from dense_rl.training.update import ignore_frozen_in_ddp, make_grad_scaler, make_optimizer

    config: Config = loop_config["config"]
    board, rollout_workers, session = loop_config["board"], loop_config["rollout_workers"], loop_config["session"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    use_threads(config.cluster.threads("learner"))
    device = "cuda" if config.cluster.learner_gpus > 0 else "cpu"
    if ray.get(board.is_ending.remote()):  # a restart while the run ends: nothing to train
        return
    try:
        pipe, params = build_policy(dataclasses.replace(config, model=dataclasses.replace(config.model, device=device)))
    except Exception as error:  # it fails the same way after any restart: stop the run with the cause
        ray.get(board.fail.remote(f"learner: {describe(error)}; check model.pretrained={config.model.pretrained!r} "
                                  "and lora.*"))
        raise
    model = denoiser(pipe)  # the UNet or flow transformer that carries the LoRA adapter
    optimizer = make_optimizer(params, config.train)
    grad_scaler = make_grad_scaler(model)  # float16 only; its scale carries over between epochs

    # The optimizer keeps this session's train.* values either way (a resume may change them).
    version, checkpoint = loop_config["start_version"], ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure (FailureConfig): this session's newest checkpoint
        with checkpoint.as_directory() as folder:
            restore_learner(RunDir(folder), model, optimizer, config.train)
        version = checkpoint_version(checkpoint.path)
    elif loop_config["resume_from"] is not None:
        restore_learner(RunDir(loop_config["run_uri"]).child(loop_config["resume_from"]), model, optimizer, config.train)
    trained = model
    if world_size > 1:
        ignore_frozen_in_ddp(model)
        trained = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    if rank == 0:
        starts, posted = ray.get(board.started.remote(version, checkpoint is not None))
        if starts > 1:  # a restart: the rollouts get the weights it restored, and the result of that version
            folder = f"{CHECKPOINTS}/{session}/{checkpoint_name(version)}" if checkpoint is not None else None
            board.post_result.remote(version, {"metrics": {}, "checkpoint": folder,
                                               "weights": publish(version, lora_state_dict(model), rollout_workers)})
        if posted is not None and posted > version:
            ray.get(board.fail.remote(
                f"the learner restarted from policy version {version}, but epoch {posted} starts from version {posted}, "
                f"which has no checkpoint (run.save_every={config.run.save_every}): resume the run with --resume"))

    while (posted := ray.get(board.take_work.remote(version, rank))) is not None:
        work: Work = ray.get(posted[0])
        trajectories = Trajectories.concat([ray.get(ref).select(rows) for ref, rows in work.pieces])
        started = time.perf_counter()
        info = update_policy(trained, pipe.scheduler, optimizer, params, trajectories, work.step_advantages, config,
                             epoch=version, rank=rank, world_size=world_size, grad_scaler=grad_scaler,
                             fetch_proximal=proximal_fetcher(work))
        info["step_seconds"] = time.perf_counter() - started
        telemetry.record_learner_update(rank, info, info["step_seconds"])
        faults.strike("learner", version, rank=rank)  # tests: a rank dies with the epoch taken, not finished
        version += 1
        if rank != 0:
            ray.train.report(info)  # every rank reports each epoch: it is Ray Train's barrier
            continue
        started, state = time.perf_counter(), lora_state_dict(model)
        weights = publish(version, state, rollout_workers)
        info["broadcast_seconds"] = time.perf_counter() - started
        telemetry.record_weight_broadcast(rank, version, info["broadcast_seconds"],
                                          sum(t.numel() * t.element_size() for t in state.values()))
        folder = None
        if checkpoint_due(version, config.run):
            with tempfile.TemporaryDirectory() as scratch:  # Ray Train persists it into the run directory
                write_learner_files(RunDir(scratch), model, optimizer)
                ray.train.report(info, checkpoint=ray.train.Checkpoint.from_directory(scratch),
                                 checkpoint_dir_name=checkpoint_name(version))
            folder = f"{CHECKPOINTS}/{session}/{checkpoint_name(version)}"
        else:
            ray.train.report(info)
        board.post_result.remote(version, {"metrics": info, "checkpoint": folder, "weights": weights})


def enable_train_view() -> None:
    """The Ray dashboard's Train view reads Ray Train's state actor, which is off unless this is set;
    Ray Train reads it in the driver when fit() starts."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")


class LearnerGroup:
    """The driver's handle on the learner group: submit an epoch, wait for its result, close. Creating it
    starts the group (Ray Train's fit, in a thread), so its start overlaps the other roles' loading."""

    def __init__(self, config: Config, rollout_workers: list, run_uri: str, start_version: int,
                 resume_from: str | None):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from dense_rl.config.layout import learner_scaling

        enable_train_view()
        self.config, self.num_workers = config, config.cluster.num_learner_workers
        self.rows_per_batch = config.sample.batch_size  # rows of each rollout batch
        self.board = LearnerBoard.remote()
        self.session = session_name(start_version)  # a fresh Ray Train run per session: its own checkpoints
        self.trainer = TorchTrainer(
            learner_loop,
            train_loop_config={"config": config, "board": self.board, "rollout_workers": rollout_workers,
                               "run_uri": run_uri, "start_version": start_version, "resume_from": resume_from,
                               "session": self.session},
            scaling_config=ScalingConfig(**learner_scaling(config.cluster)),
            run_config=RunConfig(
                name=self.session, storage_path=f"{run_uri.rstrip('/')}/{CHECKPOINTS}",
                failure_config=FailureConfig(max_failures=config.cluster.learner_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            ),
        )
        self.error: BaseException | None = None
        self.restarts_logged = 0
        self.thread = threading.Thread(target=self._fit, name="learner-fit", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as error:  # surfaced to the driver by wait()
            self.error = error

    def submit(self, epoch: int, trajectory_refs: list, step_advantages: torch.Tensor, rows: list[int],
               rescore=None) -> None:
        """Post each rank's equal share of the rows to train on (`rows`: ascending indices into the epoch;
        `step_advantages`: one row each), as (ObjectRef, row indices). `rescore([(batch index, rows),
        ...])`: the ObjectRef of those rows' proximal log-probs (Driver.rescore), for an epoch sampled by
        an older policy."""
        share, shares = rank_shares(rows, self.num_workers, self.rows_per_batch, epoch)
        proximal = [[] for _ in shares]
        if rescore is not None:
            train = self.config.train
            proximal = ask_for_proximal(shares, rescore, minibatch_size=train.batch_size // self.num_workers,
                                        seeds=[update_seed(self.config.run.seed, epoch, rank) for rank in range(len(shares))],
                                        first_minibatch_too=train.num_inner_epochs > 1)
        # Each Work goes to the board as an ObjectRef it never opens (unpickling a Work needs torch).
        works = [ray.put(Work(epoch, [(trajectory_refs[batch], local) for batch, local in pieces],
                              step_advantages[rank * share:(rank + 1) * share].clone(), proximal[rank]))
                 for rank, pieces in enumerate(shares)]
        ray.get(self.board.post_work.remote(epoch, works))

    def wait(self, epoch: int) -> LearnerResult:
        """Rank 0's result of `epoch`. A group that fails is restarted by Ray Train and serves the epoch
        again; past cluster.learner_failures restarts, or on a failure no restart mends, the run stops."""
        answer = self.board.result.remote(epoch)
        while not ray.wait([answer], timeout=1.0)[0]:
            self._check(epoch)
        result = ray.get(answer)
        if "failure" in result:
            raise RunFailed(result["failure"])
        return LearnerResult(epoch + 1, result["metrics"], result["checkpoint"], result["weights"])

    def _check(self, epoch: int) -> None:
        if self.error is not None or not self.thread.is_alive():
            failures = self.config.cluster.learner_failures
            raise RunFailed(f"the learner group failed {failures + 1} times (cluster.learner_failures={failures}); "
                            f"last: {failure_line(self.error)}")
        restarts = ray.get(self.board.start_log.remote())[1:]  # the group's first start is not a restart
        for version, from_checkpoint in restarts[self.restarts_logged:]:
            origin = f"its checkpoint of version {version}" if from_checkpoint else f"policy version {version}"
            log.warning("learner group restarted from %s (Ray Train FailureConfig); serving epoch %d to it again",
                        origin, epoch)
        self.restarts_logged = len(restarts)

    def close(self) -> None:
        try:
            ray.get(self.board.close.remote(), timeout=30)
        except RayError:  # the board is gone when Ray is shutting down
            pass
        self.thread.join(timeout=60)


def failure_line(error: BaseException | None) -> str:
    """The cause of a learner group's failure in one line: the first failed worker's error."""
    if error is None:
        return "the learner group stopped before the run ended"
    failures = getattr(error, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else error
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(cause).__name__)[:300]
