"""Unseen-reward evaluation: score a run's policies with rewards it was not trained on.

    python -m dense_rl.evaluate runs/tiny --rewards digit_alignment
    python -m dense_rl.evaluate runs/sd15-hps --rewards imagereward pickscore aesthetic=/models/aesthetic.pth \\
        --prompts heldout.txt --checkpoints all --device cuda

A run records one row per training sample (prompt, reward, credits) but only a preview grid of its
images, and those were sampled from prompts it trained on with noise that differs every epoch. The
paper's generalisation result compares the base model with the tuned one on the same held-out prompts,
so this regenerates instead: for the base model (policy version 0, LoRA off) and each chosen checkpoint
(policy version N = after N epochs), it samples every prompt `--samples-per-prompt` times with the
run's sampler settings and *the same noise for every policy* (batch b of `--batch-size` images is
seeded with `--seed` + b), then scores each image with the given rewards and the run's own ones.

Written next to the training metrics:

    RUN/unseen_rewards.parquet   one row per image: policy_version, checkpoint, prompt, sample_index,
                                 reward_<name> for every reward (the trained-on ones too, for comparison)
    RUN/unseen_rewards.png       mean (± standard error) of each reward against policy version

Default prompts: the embedded tiny model's held-out set for `embedded:tiny` runs, else the run's own
prompt file (pass `--prompts` with held-out prompts for an SD run).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from dense_rl.config import Config, ConfigError, RewardSpec, load_config
from dense_rl.run.checkpoints import LORA_FILE, latest_checkpoint, read_lora_bytes
from dense_rl.run.heldout import BEST_FOLDER, read_best
from dense_rl.run.storage import CHECKPOINTS, CONFIG_FILE, RunDir
from dense_rl.training.heldout import fixed_noise_batches

RESULTS_TABLE = "unseen_rewards.parquet"
RESULTS_PLOT = "unseen_rewards.png"
HELDOUT_PROMPTS = {"embedded:tiny": "embedded:tiny_heldout"}


# ---------------------------------------------------------------------------- inputs


def parse_reward_specs(texts: list[str]) -> list[RewardSpec]:
    """["name", "name=path", ...] -> RewardSpecs; unknown names fail here, before any model loads."""
    from dense_rl.rewards import REWARD_NAMES

    specs = []
    for text in texts:
        name, _, path = text.partition("=")
        if name not in REWARD_NAMES:
            raise ConfigError(f"--rewards: unknown reward {name!r}; choose one of {', '.join(sorted(REWARD_NAMES))}")
        if name in {s.name for s in specs}:
            raise ConfigError(f"--rewards: {name!r} is listed twice; list each reward once")
        specs.append(RewardSpec(name=name, weight=1.0, path=path or None))
    return specs


def read_run_config(run: RunDir) -> Config:
    if not run.exists(CONFIG_FILE):
        raise ConfigError(f"RUN_DIR: {run.uri} is not a dense_rl run (no {CONFIG_FILE}); pass a run's directory")
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml") as copy:
        copy.write(run.read_bytes(CONFIG_FILE))
        copy.flush()
        return load_config(copy.name)


def list_checkpoints(run: RunDir) -> dict[int, str]:
    """{policy version: checkpoint folder relative to the run} for every complete checkpoint saved."""
    import pyarrow.fs as pafs

    if not run.exists(CHECKPOINTS):
        return {}
    found = {}
    selector = pafs.FileSelector(run.path(CHECKPOINTS), recursive=True)
    root = run.path("")
    for info in run.fs.get_file_info(selector):
        match = re.search(r"(checkpoints/[^/]+/epoch-(\d+))/" + re.escape(LORA_FILE) + "$", info.path)
        if match and info.path.startswith(root) and not match.group(1).startswith(BEST_FOLDER):  # a copy
            found[int(match.group(2))] = match.group(1)
    return dict(sorted(found.items()))


def choose_checkpoints(run: RunDir, which: str) -> dict[int, str]:
    """`latest`, `best` (best.json: every guard satisfied, highest held-out reward), `all`, or
    comma-separated policy versions such as `2,4`; the base model is added separately."""
    available = list_checkpoints(run)
    if which == "all":
        return available
    if which == "best":
        best = read_best(run)
        if best is None:
            raise ConfigError(f"--checkpoints: {run.uri} has no best.json (it needs evaluation.every_epochs and a "
                              "checkpoint that satisfies every guard); use latest or all")
        return {best["policy_version"]: best["checkpoint"]}
    if which == "latest":
        latest = latest_checkpoint(run)
        return {} if latest is None else {latest["epoch"]: latest["path"]}
    try:
        wanted = [int(v) for v in which.split(",")]
    except ValueError:
        raise ConfigError(f"--checkpoints: {which!r} is not latest, best, all or a list of epochs like 2,4") from None
    missing = [v for v in wanted if v not in available]
    if missing:
        raise ConfigError(f"--checkpoints: no checkpoint for epoch {missing[0]}; the run has {sorted(available) or 'none'}")
    return {v: available[v] for v in wanted}


# ---------------------------------------------------------------------------- sampling and scoring


def sample_images(pipe, config: Config, prompts: list[str], seed: int) -> torch.Tensor:
    """Images as training scores them: 8-bit (as Trajectories.for_reward ships them), back in [0, 1]."""
    from dense_rl.diffusion.sampler import sample_trajectories
    from dense_rl.diffusion.trajectories import RewardInputs, to_uint8
    from dense_rl.training.recipe import evaluation_sampler_options

    trajectories = sample_trajectories(pipe, prompts, **evaluation_sampler_options(config, pipe),
                                       generator=torch.Generator().manual_seed(seed))
    return RewardInputs.as_float(to_uint8(trajectories.images))


def evaluate_run(
    run_uri: str,
    reward_specs: list[RewardSpec],
    *,
    prompts: str | None = None,
    checkpoints: str = "latest",
    include_base: bool = True,
    samples_per_prompt: int = 1,
    max_prompts: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = True,
) -> list[dict]:
    """Sample and score base + checkpoints; write the table and plot into the run; return the rows."""
    from dense_rl.diffusion.lora import add_lora, load_lora_state_dict
    from dense_rl.diffusion.pipeline import denoiser, load_pipeline
    from dense_rl.rewards import build_reward
    from dense_rl.training.prompts import load_prompts

    run = RunDir(run_uri)
    config = read_run_config(run)
    prompt_spec = prompts or HELDOUT_PROMPTS.get(config.model.pretrained, config.sample.prompts)
    try:
        prompt_list = load_prompts(prompt_spec)[:max_prompts]
    except ValueError as error:
        raise ConfigError(str(error).replace("sample.prompts", "--prompts", 1)) from None
    policies = choose_checkpoints(run, checkpoints)
    if include_base:
        policies = {0: "", **policies}
    if not policies:
        raise ConfigError(f"--no-base: {run.uri} has no checkpoint yet, so nothing is left to evaluate; drop --no-base")
    trained = [spec.name for spec in config.rewards]
    specs = reward_specs + [spec for spec in config.rewards if spec.name not in {s.name for s in reward_specs}]

    rewards = {}
    for spec in specs:  # before the pipeline: a bad reward path fails fast
        try:
            rewards[spec.name] = build_reward(spec.name, spec.path, device)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"--rewards: {spec.name}: {error}") from None
    # Half precision only where the run used it and on the device it was meant for.
    dtype = config.model.dtype if device == config.model.device else "float32"
    pipe = load_pipeline(config.model.pretrained, dtype=dtype, device=device, revision=config.model.revision)
    model = denoiser(pipe)
    add_lora(model, config.lora.rank, config.lora.alpha, config.lora.target_modules)

    batches = fixed_noise_batches(prompt_list, samples_per_prompt, batch_size, seed)
    rows = []
    bar = tqdm(total=len(policies) * len(batches), desc="evaluating", unit="batch", disable=not show_progress)
    for version, checkpoint in policies.items():
        if checkpoint:
            load_lora_state_dict(model, read_lora_bytes(run, f"{checkpoint}/{LORA_FILE}"))
            model.enable_adapters()
        else:
            model.disable_adapters()  # the pretrained model itself
        for batch_seed, items in batches:
            batch_prompts = [prompt for prompt, _ in items]
            images = sample_images(pipe, config, batch_prompts, batch_seed)
            scores = {name: torch.as_tensor(r(images, batch_prompts)).float().cpu() for name, r in rewards.items()}
            for i, (prompt, index) in enumerate(items):
                rows.append({
                    "policy_version": version, "checkpoint": checkpoint, "prompt": prompt, "sample_index": index,
                    "seed": batch_seed, **{f"reward_{name}": float(v[i]) for name, v in scores.items()},
                })
            bar.update()
    bar.close()

    run.write_table(RESULTS_TABLE, rows)
    run.write_bytes(RESULTS_PLOT, results_png(rows, list(rewards), trained, title=config.run.name or run.uri))
    return rows


# ---------------------------------------------------------------------------- summary


def summarise(rows: list[dict], names: list[str]) -> dict[int, dict[str, tuple[float, float]]]:
    """{policy version: {reward: (mean, standard error)}}."""
    summary = {}
    for version in sorted({row["policy_version"] for row in rows}):
        values = {n: np.array([r[f"reward_{n}"] for r in rows if r["policy_version"] == version]) for n in names}
        summary[version] = {
            n: (float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0) for n, v in values.items()
        }
    return summary


def results_png(rows: list[dict], names: list[str], trained: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows, names)
    versions = sorted(summary)
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), dpi=110, squeeze=False)
    for axis, name in zip(axes[0], names):
        means = [summary[v][name][0] for v in versions]
        errors = [summary[v][name][1] for v in versions]
        axis.errorbar(versions, means, yerr=errors, marker="o", capsize=3)
        axis.set_title(f"{name} ({'trained on' if name in trained else 'unseen'})", fontsize=9)
        axis.set_xlabel("policy version (0 = base)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean reward ± s.e.")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def summary_lines(rows: list[dict], names: list[str], trained: list[str]) -> list[str]:
    summary = summarise(rows, names)
    header = "policy  " + "  ".join(f"{n + ('*' if n in trained else ''):>22}" for n in names)
    lines = [header]
    for version, values in summary.items():
        label = "base" if version == 0 else f"ep {version}"
        lines.append(f"{label:>6}  " + "  ".join(f"{m:>13.4f} ± {e:<6.4f}" for m, e in values.values()))
    lines.append("(* trained on)")
    return lines


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dense_rl.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or URI) written by dense_rl.launch")
    parser.add_argument("--rewards", nargs="+", required=True, metavar="NAME[=PATH]", help="rewards to score with")
    parser.add_argument("--prompts", help="prompt file or embedded:NAME (default: held-out set for the tiny model, else the run's)")
    parser.add_argument("--checkpoints", "--checkpoint", default="latest",
                        help="latest (default), best (best.json), all, or epochs like 2,4")
    parser.add_argument("--no-base", action="store_true", help="do not evaluate the base model (policy version 0)")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
            # On a shared or oversubscribed machine, fewer threads than cores is much faster.
            torch.set_num_threads(args.threads)
        for name in ("samples_per_prompt", "batch_size"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        if args.max_prompts is not None and args.max_prompts < 1:
            raise ConfigError(f"--max-prompts: must be >= 1, got {args.max_prompts}")
        specs = parse_reward_specs(args.rewards)
        rows = evaluate_run(
            args.run_dir, specs, prompts=args.prompts, checkpoints=args.checkpoints, include_base=not args.no_base,
            samples_per_prompt=args.samples_per_prompt, max_prompts=args.max_prompts, batch_size=args.batch_size,
            seed=args.seed, device=args.device,
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = RunDir(args.run_dir)
    names = [k[len("reward_"):] for k in rows[0] if k.startswith("reward_")]
    trained = [spec.name for spec in read_run_config(run).rewards]
    print("\n".join(summary_lines(rows, names, trained)))
    print(f"wrote {run.uri}/{RESULTS_TABLE} and {run.uri}/{RESULTS_PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
