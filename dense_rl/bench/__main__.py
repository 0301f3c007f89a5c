"""`python -m dense_rl.bench <name> [--quick] [--out DIR] ...`

    sample-efficiency   CoCA vs DDPO (sparse) vs UCA (uniform): reward against samples, several seeds
    throughput          credit cost, Ray vs in-process, async vs sync, weight broadcast, object-store bytes
    scaling             throughput against the number of rollout actors on the local multi-node cluster
    peer                the peer workload on a local diffusers folder: in-process, Ray sync and async (and the peer's scripts)
    learner-start       starting the learner group: Ray Train's TorchTrainer against plain Ray actors
    guards              a reward gamed with and without a guard on an unseen held-out reward
    credit-comparison   every credit method against a tuned sparse baseline, both families, guarded by an unseen reward
    time-to-reward      wall-clock seconds for dense_rl to reach TRL DDPOTrainer's reward on the peer workload
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

BENCHMARKS = {
    "sample-efficiency": "dense_rl.bench.sample_efficiency",
    "throughput": "dense_rl.bench.throughput",
    "scaling": "dense_rl.bench.scaling",
    "peer": "dense_rl.bench.peer",
    "learner-start": "dense_rl.bench.learner_start",
    "guards": "dense_rl.bench.guards",
    "credit-comparison": "dense_rl.bench.credit_comparison",
    "time-to-reward": "dense_rl.bench.time_to_reward",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        return 0
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Loading bars of every pipeline load would bury the benchmark's own progress bar.
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
