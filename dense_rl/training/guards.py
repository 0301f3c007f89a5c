"""Guards against reward hacking: rules on the held-out evaluation (a reward may not fall more than so
far below the base model's, a monitor stays within bounds), checked at every evaluation, which warn or
stop the run; and the best checkpoint, the one with the highest held-out `trained` reward among those
that satisfy every guard. The same for the Ray driver and the in-process trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dense_rl.config import Config, GuardConfig
from dense_rl.run.heldout import append_heldout, cache_base, cached_base, mark_best, read_best, read_heldout
from dense_rl.run.storage import RunDir
from dense_rl.training.heldout import TRAINED, heldout_rows, heldout_set

log = logging.getLogger("dense_rl")


@dataclass(frozen=True)
class GuardCheck:
    index: int
    guard: GuardConfig
    value: float
    limit: float
    base: float | None

    @property
    def tripped(self) -> bool:
        return self.value > self.limit if self.guard.max is not None else self.value < self.limit

    def describe(self, epoch: int, policy_version: int) -> str:
        guard = self.guard
        rule = (f"max_drop {guard.max_drop:g}" if guard.max_drop is not None
                else f"min {guard.min:g}" if guard.min is not None else f"max {guard.max:g}")
        where = f"{self.value:.4f} at epoch {epoch} (policy version {policy_version})"
        if guard.max_drop is not None:
            where += f", {self.base - self.value:.4f} below the base model's {self.base:.4f}"
        return f"guard guards[{self.index}] {guard.metric} {rule}: {where}; limit {self.limit:.4f}"


def check_guards(guards: list[GuardConfig], base: dict[str, float], scores: dict[str, float]) -> list[GuardCheck]:
    """Each guard's verdict on one evaluation's means (`scores`), against the base model's (`base`)."""
    checks = []
    for index, guard in enumerate(guards):
        if guard.metric not in scores:  # a monitor this evaluation has no value for
            continue
        if guard.max_drop is not None:
            limit = base[guard.metric] - guard.max_drop
        else:
            limit = guard.min if guard.min is not None else guard.max
        checks.append(GuardCheck(index, guard, scores[guard.metric], limit, base.get(guard.metric)))
    return checks


@dataclass(frozen=True)
class Verdict:
    """The guards on one held-out evaluation."""

    epoch: int
    policy_version: int
    scores: dict[str, float]  # the evaluation's means
    checks: list[GuardCheck]

    @property
    def tripped(self) -> list[GuardCheck]:
        return [check for check in self.checks if check.tripped]

    @property
    def stop(self) -> str | None:
        """The line naming the first tripped guard whose action is stop; None when the run goes on."""
        stopping = [check for check in self.tripped if check.guard.action == "stop"]
        return stopping[0].describe(self.epoch, self.policy_version) if stopping else None


def means(rows: list[dict]) -> dict[str, float]:
    return {row["reward"]: row["mean"] for row in rows}


class HeldoutWatch:
    """One run's held-out evaluations: when they are due, the base model's scores (from the run's own
    rows, else the cache beside the runs, else to be computed), a row per reward and monitor in
    heldout.parquet, the guards' verdicts and best.json. Without a run directory (benchmarks) the rows are
    kept in memory only."""

    def __init__(self, config: Config, run: RunDir | None):
        self.config, self.run = config, run
        self.rows = read_heldout(run) if run is not None else []
        self.prompts = heldout_set(config).prompts if self.enabled else []
        base = [row for row in self.rows if row["policy_version"] == 0] or (
            (cached_base(config, self.prompts) or []) if self.enabled else [])
        self.base = means(base) or None
        if base and not any(row["policy_version"] == 0 for row in self.rows):
            self._keep(base)
        self.best = read_best(run) if run is not None else None

    @property
    def enabled(self) -> bool:
        return self.config.evaluation.every_epochs > 0

    def due(self, policy_version: int) -> bool:
        return self.enabled and policy_version % self.config.evaluation.every_epochs == 0

    def _keep(self, rows: list[dict]) -> None:
        self.rows = [row for row in self.rows if row["policy_version"] != rows[0]["policy_version"]] + rows
        if self.run is not None:
            append_heldout(self.run, rows)

    def record_base(self, scores: list) -> None:
        """The base model's scores (policy version 0), computed once and cached for later runs."""
        rows = heldout_rows(scores, epoch=-1, policy_version=0, samples=0)
        self.base = means(rows)
        self._keep(rows)
        cache_base(self.config, self.prompts, rows)

    def check(self, scores: list, *, epoch: int, policy_version: int, samples: int) -> "Verdict":
        """One evaluation of policy `policy_version` (trained through `epoch`): its rows, and the guards'
        verdicts, each tripped one logged."""
        rows = heldout_rows(scores, epoch=epoch, policy_version=policy_version, samples=samples)
        self._keep(rows)
        current = means(rows)
        verdict = Verdict(epoch, policy_version, current, check_guards(self.config.guards, self.base, current))
        for check in verdict.tripped:
            log.warning("%s%s", check.describe(epoch, policy_version),
                        "; stopping the run" if check.guard.action == "stop" else "")
        return verdict

    def keep_if_best(self, verdict: "Verdict", checkpoint: str | None) -> None:
        """best.json names `checkpoint` (the whole checkpoint of the verdict's policy) if that policy
        satisfies every guard and has the highest held-out `trained` reward so far."""
        if verdict.tripped or checkpoint is None or self.run is None:
            return
        if self.best is not None and verdict.scores[TRAINED] <= self.best["scores"][TRAINED]:
            return
        folder = mark_best(self.run, checkpoint, policy_version=verdict.policy_version, epoch=verdict.epoch,
                           scores=verdict.scores)
        self.best = read_best(self.run)
        log.info("best checkpoint so far: %s (held-out %s %.4f)", folder, TRAINED, verdict.scores[TRAINED])

    def latest(self) -> dict[str, float]:
        """The newest evaluation's means (telemetry)."""
        newest = max(row["policy_version"] for row in self.rows)
        return means([row for row in self.rows if row["policy_version"] == newest])
