"""Keeping an epoch whole when actors fail (docs/reliability.md); the driver's stages call these.

- A rollout actor that dies restarts (Ray's max_restarts, cluster.actor_restarts). Every batch it had
  not delivered is issued again, newest weights first, to the next worker (the restarted one or
  another). A batch's seed, not its worker, decides its noise, so the epoch ends with exactly the
  batches it would have had: none lost, none twice.
- A reward call that raises, or a reward actor that dies (it restarts too), is retried up to
  cluster.reward_retries times; then the run stops with RunFailed naming the reward and the cause.
- An actor whose constructor fails (a model that is not there, LoRA modules that match nothing) is
  not restarted by Ray; the driver waits for every actor to start and stops the run with the cause in
  one line (`wait_until_started`).
- NaN or infinite rewards (dense_rl/training/scoring.py::finite_rewards) are dropped from the update and
  counted; an epoch with no finite reward stops the run rather than train on garbage.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError, RayTaskError

from dense_rl.config import RunFailed
from dense_rl.system.errors import start_failure
from dense_rl.system.messages import RolloutBatch

log = logging.getLogger("dense_rl")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


class Recovery:
    def __init__(self, rollout_workers: list, reward_workers: list, config, reward_names: list[str]):
        cluster = config.cluster
        self.rollout_workers = rollout_workers
        self.reward_workers = reward_workers
        self.reward_retries = cluster.reward_retries
        # Each worker may die actor_restarts + 1 times before it is gone for good; past that, no worker is left.
        self.max_reissues = (cluster.actor_restarts + 1) * len(rollout_workers)
        self.reward_names = ", ".join(repr(name) for name in reward_names)
        self.weights: tuple[int, list | None] = (0, None)  # (version, [ObjectRef]) the rollouts should hold

    # ------------------------------------------------------------------ weights

    def set_weights(self, version: int, state_or_ref) -> None:
        """Keep the newest weights in an object the driver owns, so a restarted rollout actor can be
        given them even after the learner process that published them has died."""
        try:
            state = ray.get(state_or_ref) if isinstance(state_or_ref, ray.ObjectRef) else state_or_ref
        except RayError as error:  # its publisher died at once; a restarted learner group publishes again
            log.warning("could not keep the weights of version %d (%s)", version, first_line(error))
            return
        self.weights = (version, [ray.put(state)])

    # ------------------------------------------------------------------ rollouts

    def issue(self, batch: RolloutBatch, sync_weights: bool = False) -> None:
        worker = self.rollout_workers[batch.worker]
        version, weights = self.weights
        give = (version, weights) if sync_weights and weights is not None else None
        batch.ref, batch.reward_ref = worker.generate.remote(batch.prompts, batch.seed, give)

    def reissue(self, batch: RolloutBatch, why: str) -> None:
        """Sample `batch` again on the next live worker, after giving it the newest weights."""
        batch.reissues += 1
        if batch.reissues > self.max_reissues:
            self._all_gone(batch, why)
        batch.worker = self._live_worker((batch.worker + 1) % len(self.rollout_workers), batch, why)
        log.warning("rollout batch %d of epoch %d: %s; issuing it again to rollout worker %d",
                    batch.index, batch.epoch, why, batch.worker)
        self.issue(batch, sync_weights=True)

    def _live_worker(self, start: int, batch: RolloutBatch, why: str) -> int:
        """The first worker from `start` on that answers, waiting while Ray restarts one (calls to a
        restarting actor fail at once); one past its restarts is skipped."""
        for offset in range(len(self.rollout_workers)):
            index = (start + offset) % len(self.rollout_workers)
            if wait_until_alive(self.rollout_workers[index]):
                return index
        self._all_gone(batch, why)

    def _all_gone(self, batch: RolloutBatch, why: str):
        raise RunFailed(
            f"cluster.num_rollout_workers: batch {batch.index} of epoch {batch.epoch} failed {batch.reissues} "
            f"times, last: {why}; no rollout worker is left (cluster.actor_restarts="
            f"{self.max_reissues // len(self.rollout_workers) - 1}); check the rollout actors' logs"
        )

    # ------------------------------------------------------------------ rewards

    def _score(self, position: int, batch: RolloutBatch) -> ray.ObjectRef:
        return self.reward_workers[position % len(self.reward_workers)].score.remote(batch.reward_ref)

    def score(self, batches: list[RolloutBatch], while_waiting=None) -> list:
        """ScoredBatch per batch, re-issuing lost rollouts and retrying failed reward calls.
        `while_waiting(trajectory_refs, num_scored)` is called about twice a second (stage metrics)."""
        pending = {self._score(i, b): i for i, b in enumerate(batches)}
        results: list = [None] * len(batches)
        reward_failures = [0] * len(batches)
        while pending:
            if while_waiting is not None:
                while_waiting([b.ref for b in batches], len(batches) - len(pending))
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if not done:
                continue
            ready = done[0]
            position = pending.pop(ready)
            try:
                results[position] = ray.get(ready)
                continue
            except RayError as error:
                batch = batches[position]
                if self._rollout_lost(error):
                    self.reissue(batch, f"lost ({first_line(getattr(error, 'cause', None) or error)})")
                else:
                    reward_failures[position] += 1
                    self._reward_failed(position, batch, error, reward_failures[position])
            pending[self._score(position, batches[position])] = position
        return results

    @staticmethod
    def _rollout_lost(error: RayError) -> bool:
        """Was it the batch's trajectories (rollout actor died or raised) rather than the reward call?"""
        if isinstance(error, RayTaskError):
            # An input that could not be computed comes back as the score task's error with that cause.
            return isinstance(error, RayActorError) or "RolloutWorker.generate" in str(error).split("\n", 1)[0]
        return not isinstance(error, RayActorError)  # a lost object (node gone), not the reward actor

    def _reward_failed(self, position: int, batch: RolloutBatch, error: RayError, failures: int) -> None:
        from dense_rl.rewards import RewardFailed

        cause = getattr(error, "cause", None)
        if isinstance(cause, RewardFailed):
            what = str(cause)
        else:  # the reward actor itself died (it restarts) or raised outside a reward model
            what = f"the reward actor for {self.reward_names} failed: {first_line(cause or error)}"
        if failures > self.reward_retries:
            raise RunFailed(f"rewards: {what}; gave up after {failures} attempts (cluster.reward_retries="
                            f"{self.reward_retries})") from None
        log.warning("%s; retrying batch %d of epoch %d (attempt %d of %d)", what, batch.index, batch.epoch,
                    failures + 1, self.reward_retries + 1)
        if isinstance(error, ActorUnavailableError) and not isinstance(error, RayTaskError):
            wait_until_alive(self.reward_workers[position % len(self.reward_workers)])  # Ray restarts it


def wait_until_alive(actor, timeout_s: float = 600.0) -> bool:
    """True once `actor` answers; False if it is dead for good (past its restarts) or never returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.pid.remote())
            return True
        except ActorDiedError:
            return False
        except ActorUnavailableError:  # restarting: its constructor is still running
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def wait_until_started(actors: dict[str, list], hint: dict[str, str]) -> None:
    """Wait until every actor's constructor has finished; the first that failed stops the run with
    one line naming its role and the cause. Ray does not restart an actor whose constructor raised,
    so without this the failure would surface later as a lost batch, under the wrong name."""
    calls = {actor.pid.remote(): (role, index) for role, group in actors.items() for index, actor in enumerate(group)}
    while calls:
        done, _ = ray.wait(list(calls), num_returns=1)
        role, index = calls.pop(done[0])
        try:
            ray.get(done[0])
        except RayError as error:
            cause = start_failure(str(error)) or first_line(error)
            raise RunFailed(f"{role} worker {index} could not start: {cause}; {hint[role]}") from None
