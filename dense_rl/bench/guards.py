"""`python -m dense_rl.bench guards`: a reward gamed with and without a guard on an unseen reward.

The embedded model trained on `brightness` with CoCA learns to brighten its digits until they fade,
which the unseen `digit_alignment` reward shows on held-out prompts. Two in-process runs of the same
seed: one with `guards: [{metric: digit_alignment, max_drop: 0.05, action: stop}]`, one without. It plots
both held-out rewards against samples for each (the stop, and the checkpoint best.json names, marked),
and writes the runs' heldout.parquet rows into results.json.

    python -m dense_rl.bench guards [--epochs 16] [--out docs/benchmarks/guards]
"""

from __future__ import annotations

import argparse
import sys
import time

from dense_rl.bench.common import Report, load_average, pyplot

RUN = ["rewards=[{name: brightness}]", "credit.mode=coca", "sample.num_steps=10", "train.lr=1e-2",
       "train.clip_range=1e-2", "evaluation.every_epochs=2", "evaluation.max_prompts=24",
       "evaluation.rewards=[digit_alignment]"]
GUARD = "guards=[{metric: digit_alignment, max_drop: 0.05, action: stop}]"


def run(out: str, name: str, overrides: list[str]) -> dict:
    from dense_rl.config import load_config
    from dense_rl.run.heldout import read_best, read_heldout
    from dense_rl.run.storage import RunDir
    from dense_rl.training.trainer import train

    config = load_config("configs/tiny.yaml", [*overrides, f"run.output_dir={out}/runs", f"run.name={name}"])
    started = time.perf_counter()
    history = train(config, run_uri=f"{out}/runs/{name}", show_progress=False)
    folder = RunDir(f"{out}/runs/{name}")
    return {"epochs": len(history), "seconds": time.perf_counter() - started, "stopped_by": history[-1].get("stopped_by"),
            "heldout": read_heldout(folder), "best": read_best(folder), "load_average": load_average()}


def plot(runs: dict, path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110, sharey=False)
    for axis, reward, label in ((axes[0], "trained", "trained: brightness"), (axes[1], "digit_alignment", "unseen: digit alignment")):
        for name, style in (("without guard", "-o"), ("with guard", "-s")):
            rows = sorted((row["samples"], row["mean"]) for row in runs[name]["heldout"] if row["reward"] == reward)
            axis.plot([s for s, _ in rows], [m for _, m in rows], style, markersize=4, label=name)
            best = runs[name]["best"]
            if name == "with guard" and best is not None:
                samples = next(row["samples"] for row in runs[name]["heldout"]
                               if row["policy_version"] == best["policy_version"])
                axis.plot([samples], [best["scores"][reward]], "*", markersize=14, color="tab:green", label="best.json")
        if reward == "digit_alignment":
            base = next(row["mean"] for row in runs["with guard"]["heldout"]
                        if row["reward"] == reward and row["policy_version"] == 0)
            axis.axhline(base - 0.05, color="tab:red", linestyle=":", label="guard: base - 0.05")
        axis.set_title(f"held-out {label}", fontsize=10)
        axis.set_xlabel("training samples")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dense_rl.bench guards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--out", default="runs/bench/guards")
    parser.add_argument("--quick", action="store_true", help="4 epochs (a smoke test)")
    args = parser.parse_args(argv)
    epochs = 4 if args.quick else args.epochs
    report = Report("guards", args.out, {"epochs": epochs, "run": RUN, "guard": GUARD})
    runs = {}
    for name, extra in (("with guard", [GUARD]), ("without guard", [])):
        print(f"{name}: training {epochs} epochs in-process", file=sys.stderr)
        runs[name] = run(args.out, name.replace(" ", "-"), [*RUN, f"run.num_epochs={epochs}", *extra])
        report["runs"] = runs
    plot(runs, f"{args.out}/guards.png")
    for name, result in runs.items():
        print(f"{name}: {result['epochs']} epochs, {result['seconds']:.0f} s; stopped by: {result['stopped_by']}; "
              f"best: {result['best'] and result['best']['checkpoint']}")
    print(f"results in {report.finish()}, plot in {args.out}/guards.png")
    return 0
