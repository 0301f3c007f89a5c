"""The learner group: `cluster.num_learner_workers` Ray actors (LearnerRank) that run PPO on the LoRA
parameters under DDP (torch.distributed; gloo on CPU, NCCL on GPU).

The driver hands each rank its share of an epoch (one `LearnerRank.update` call per rank and epoch).
After the update, rank 0 publishes the new LoRA state once (`ray.put`) to every RolloutWorker, writes
its checkpoint files (LoRA, optimizer: dense_rl/run/checkpoints.py) straight into the run directory and
returns the result.

A rank that fails (its process killed, its node lost, an exception) fails the epoch: the group kills
its ranks and starts new ones from the newest checkpoint the driver holds, whose rank 0 publishes those
weights to the rollouts, and the epoch is served to it again; at most cluster.learner_failures times
in a run, then the run stops with the cause.

The ranks set up their process group themselves rather than through Ray Train's TorchTrainer, whose
controller and helper actors (7 more processes) made a 2-rank group ready 2.6-2.9x later on 2 cores,
at 2.2-2.5x the CPU (`python -m dense_rl.bench learner-start`; docs/benchmarks.md, "The learner group
without Ray Train").
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time

import ray
import torch
from ray.exceptions import RayActorError, RayError

from dense_rl.config import Config, RunFailed
from dense_rl.run.checkpoints import checkpoint_name, restore_learner, write_learner_files
from dense_rl.run.storage import CHECKPOINTS
from dense_rl.system.errors import start_errors, start_failure
from dense_rl.system.messages import LearnerResult, Work
from dense_rl.system.recovery import first_line
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


def rendezvous_address() -> str:
    """A process group's init_method on this node: its Ray IP and a port free now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def join_process_group(model: torch.nn.Module, address: str, rank: int, world_size: int, device: str):
    """Join the ranks' process group (NCCL on GPU, gloo on CPU) and wrap `model` in DDP, which then
    synchronises only its trained parameters (update.ignore_frozen_in_ddp)."""
    import torch.distributed as dist

    from dense_rl.training.update import ignore_frozen_in_ddp

    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=address, rank=rank, world_size=world_size)
    ignore_frozen_in_ddp(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None,
                                                     find_unused_parameters=False)


@ray.remote(max_restarts=0)  # the group restarts as a whole (LearnerGroup), from a checkpoint
class LearnerRank:
    """One DDP rank: the policy, its optimizer and its loss scale, updated once per epoch."""

    @start_errors  # a failed start reaches the driver as one line (dense_rl.system.errors)
    def __init__(self, config: Config, rank: int, world_size: int, run_uri: str, checkpoint_prefix: str,
                 rollout_workers: list):
        from dense_rl.diffusion.pipeline import build_policy, denoiser
        from dense_rl.run.storage import RunDir
        from dense_rl.system.roles import use_threads
        from dense_rl.training.update import make_grad_scaler, make_optimizer

        use_threads(config.cluster.threads("learner"))
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = "cuda" if config.cluster.learner_gpus > 0 else "cpu"
        self.pipe, self.params = build_policy(dataclasses.replace(config, model=dataclasses.replace(config.model, device=self.device)))
        self.model = denoiser(self.pipe)  # the UNet or flow transformer that carries the LoRA adapter
        self.trained = self.model  # what the update runs: the DDP wrapper when there are several ranks
        self.optimizer = make_optimizer(self.params, config.train)
        self.grad_scaler = make_grad_scaler(self.model)  # float16 only; its scale carries over between epochs
        self.run, self.checkpoint_prefix, self.rollout_workers = RunDir(run_uri), checkpoint_prefix, rollout_workers
        self.version: int | None = None  # the policy version the weights hold, once joined

    def address(self) -> str:
        """Where the ranks' process group meets (asked of rank 0)."""
        return rendezvous_address()

    def join(self, address: str | None, version: int, checkpoint: str | None, restarted: bool) -> None:
        """Load `checkpoint` (policy version `version`; None: the base policy) into the model and the
        optimizer (which keeps this session's train.* values: a resume may change them), then join the
        process group and wrap the model in DDP. Rank 0 of a restarted group publishes what it loaded."""
        if checkpoint is not None:
            restore_learner(self.run.child(checkpoint), self.model, self.optimizer, self.config.train)
        self.version = version
        if self.world_size > 1:
            self.trained = join_process_group(self.model, address, self.rank, self.world_size, self.device)
        if restarted and self.rank == 0:
            from dense_rl.diffusion.lora import lora_state_dict

            publish(version, lora_state_dict(self.model), self.rollout_workers)

    def update(self, work: Work) -> LearnerResult | None:
        """PPO on this rank's share of one epoch. Rank 0 then publishes the new weights, writes the
        checkpoint when one is due and returns the result; the other ranks return None."""
        from dense_rl.diffusion.lora import lora_state_dict
        from dense_rl.diffusion.trajectories import Trajectories
        from dense_rl.system import faults, telemetry
        from dense_rl.training.recipe import update_policy

        config, epoch = self.config, work.epoch
        if epoch != self.version:  # restarted from an older checkpoint than the epoch starts from
            raise RuntimeError(f"the learner holds policy version {self.version} but epoch {epoch} starts from version "
                               f"{epoch}, which has no checkpoint (run.save_every={config.run.save_every}): resume the "
                               "run with --resume")
        trajectories = Trajectories.concat([ray.get(ref).select(rows) for ref, rows in work.pieces])
        started = time.perf_counter()
        info = update_policy(self.trained, self.pipe.scheduler, self.optimizer, self.params, trajectories,
                             work.step_advantages, config, epoch=epoch, rank=self.rank, world_size=self.world_size,
                             grad_scaler=self.grad_scaler, fetch_proximal=proximal_fetcher(work))
        info["step_seconds"] = time.perf_counter() - started
        telemetry.record_learner_update(self.rank, info, info["step_seconds"])
        faults.strike("learner", epoch, rank=self.rank)  # tests: a rank dies with the epoch taken, not finished
        self.version = epoch + 1
        if self.rank != 0:
            return None
        started, state = time.perf_counter(), lora_state_dict(self.model)
        weights = publish(self.version, state, self.rollout_workers)
        info["broadcast_seconds"] = time.perf_counter() - started
        telemetry.record_weight_broadcast(self.rank, self.version, info["broadcast_seconds"],
                                        sum(t.numel() * t.element_size() for t in state.values()))
        checkpoint = None
        if self.version % config.run.save_every == 0 or self.version == config.run.num_epochs:
            # Written in place through RunDir (temporary name, then rename: no file is ever seen half written).
            checkpoint = f"{self.checkpoint_prefix}/{checkpoint_name(self.version)}"
            write_learner_files(self.run.child(checkpoint), self.model, self.optimizer)
        return LearnerResult(self.version, info, checkpoint, weights)


class LearnerGroup:
    """The driver's handle on the learner ranks: submit an epoch, wait for its result, close."""

    def __init__(self, config: Config, rollout_workers: list, run_uri: str, start_version: int,
                 resume_from: str | None):
        self.config, self.rollout_workers, self.run_uri = config, rollout_workers, run_uri
        self.num_workers = config.cluster.num_learner_workers
        self.rows_per_batch = config.sample.batch_size  # rows of each rollout batch
        # A folder per session: a resumed run never overwrites the checkpoints of an earlier session.
        self.checkpoint_prefix = f"{CHECKPOINTS}/from-epoch-{start_version:04d}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.start_point = (start_version, resume_from)  # the newest checkpoint: (version, folder)
        self.failures_left = config.cluster.learner_failures
        self.served: list[Work] = []  # the epoch the group holds now, to serve again after a restart
        self.calls: list = []  # the ranks' update calls for it
        self._start(restarted=False)

    def _start(self, restarted: bool) -> None:
        """New ranks, loading the start point. Nothing waits here: each rank runs its calls in order,
        so its first update follows its join."""
        cluster = self.config.cluster
        options = dict(num_cpus=cluster.learner_cpus, num_gpus=cluster.learner_gpus,
                       resources=cluster.custom_resources("learner"))
        self.ranks = [LearnerRank.options(**options).remote(self.config, rank, self.num_workers, self.run_uri,
                                                            self.checkpoint_prefix, self.rollout_workers)
                      for rank in range(self.num_workers)]
        address = self.ranks[0].address.remote() if self.num_workers > 1 else None
        version, folder = self.start_point
        self.joined = [rank.join.remote(address, version, folder, restarted) for rank in self.ranks]

    def submit(self, epoch: int, trajectory_refs: list, step_advantages: torch.Tensor, rows: list[int],
               rescore=None) -> None:
        """Hand each rank its equal share of the rows to train on (`rows`: ascending indices into the
        epoch, those with a finite reward; `step_advantages`: one row each), as (ObjectRef, row indices).
        `rescore([(batch index, rows), ...])`: the ObjectRef of those rows' proximal log-probs
        (Driver.rescore), for an epoch sampled by an older policy."""
        share, shares = rank_shares(rows, self.num_workers, self.rows_per_batch, epoch)
        proximal = [[] for _ in shares]
        if rescore is not None:
            train = self.config.train
            proximal = ask_for_proximal(shares, rescore, minibatch_size=train.batch_size // self.num_workers,
                                        seeds=[update_seed(self.config.run.seed, epoch, rank) for rank in range(len(shares))],
                                        first_minibatch_too=train.num_inner_epochs > 1)
        self.served = [Work(epoch, [(trajectory_refs[batch], local) for batch, local in pieces],
                            step_advantages[rank * share:(rank + 1) * share].clone(), proximal[rank])
                       for rank, pieces in enumerate(shares)]
        self._serve()

    def _serve(self) -> None:
        self.calls = [rank.update.remote(work) for rank, work in zip(self.ranks, self.served)]

    def wait(self, epoch: int) -> LearnerResult:
        while True:
            try:
                # The first failure, as soon as it comes: the other ranks may be stuck in a collective
                # with the one that died.
                pending = self.joined + self.calls
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)
            except RayError as error:
                self._restart(epoch, error)
                continue
            result = ray.get(self.calls[0])
            if result.checkpoint is not None:
                self.start_point = (result.version, result.checkpoint)
            return result

    def _restart(self, epoch: int, error: RayError) -> None:
        start_cause = start_failure(str(error))
        if start_cause is not None:  # a constructor fails the same way every time
            raise RunFailed(f"learner: {start_cause}; check model.pretrained={self.config.model.pretrained!r} and "
                            "lora.*") from error
        cause = first_line(error)
        if self.failures_left == 0:
            raise RunFailed(f"the learner group failed {self.config.cluster.learner_failures + 1} times "
                            f"(cluster.learner_failures={self.config.cluster.learner_failures}); last: {cause}") from error
        self.failures_left -= 1
        for rank in self.ranks:
            ray.kill(rank)
        version, folder = self.start_point
        log.warning("learner group restarted from %s after %s; serving epoch %d to it again",
                    f"its checkpoint of version {version}" if folder else f"policy version {version}", cause, epoch)
        self._start(restarted=True)
        self._serve()

    def close(self) -> None:
        for rank in self.ranks:  # a Ray session shared with others keeps going
            ray.kill(rank)
