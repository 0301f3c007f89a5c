"""`python -m dense_rl.launch`: config -> actors + trainer -> the epoch loop.

    python -m dense_rl.launch                                    # the embedded tiny model, local Ray
    python -m dense_rl.launch --config configs/tiny.yaml --set train.lr=1e-4 --set credit.mode=uniform
    python -m dense_rl.launch --resume runs/tiny                 # continue from the newest checkpoint
    ray job submit --working-dir . -- python -m dense_rl.launch --config configs/sd15-jpeg.yaml

Every input is checked before Ray starts; a bad one prints one line naming the field and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from dense_rl.config import Config, ConfigError, load_config

log = logging.getLogger("dense_rl")


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as the one line every other input error is (`error: <what>; <fix>`, status 2)."""

    def error(self, message: str):
        print(f"error: {message}; see python -m dense_rl.launch --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m dense_rl.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML preset, e.g. configs/tiny.yaml (default: built-in tiny defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    parser.add_argument("--in-process", action="store_true",
                        help="run the single-process reference loop instead of the Ray system")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and the actors' output")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The config and the run directory URI. On --resume the run's own config.yaml is the base."""
    from dense_rl.run.storage import CONFIG_FILE, RunDir

    if args.resume:
        if args.config:
            raise ConfigError("--config: not allowed with --resume (the run's own config is used); use --set to change values")
        run = RunDir(args.resume)
        if not run.exists(CONFIG_FILE):
            raise ConfigError(f"--resume: {args.resume} is not a dense_rl run (no {CONFIG_FILE}); pass the run's directory")
        import tempfile

        with tempfile.NamedTemporaryFile("wb", suffix=".yaml") as copy:
            copy.write(run.read_bytes(CONFIG_FILE))
            copy.flush()
            config = load_config(copy.name, args.overrides)
        return config, run.uri
    config = load_config(args.config, args.overrides)
    from dense_rl.run.registry import registered_run_uri

    registered = registered_run_uri(config)  # a job resubmitted under the same run.name (Redis registry)
    if registered is not None:
        log.info("run %r is in the registry: resuming %s", config.run.name, registered)
        args.resume, args.config = registered, None
        return resolve_config(args)
    if not config.run.name:
        config.run.name = time.strftime("run-%Y%m%d-%H%M%S")
    return config, f"{config.run.output_dir.rstrip('/')}/{config.run.name}"


def preflight(config: Config, run_uri: str, resuming: bool) -> None:
    """Checks that read files but load no weights: run before Ray starts. The model checks come last:
    they import diffusers (for the UNet built on the meta device)."""
    from dense_rl.config.preflight import (
        check_family_settings,
        check_lora_file,
        check_memory,
        check_target_modules,
        compile_problem,
        model_folder,
    )
    from dense_rl.run.checkpoints import latest_checkpoint
    from dense_rl.run.storage import RunDir
    from dense_rl.training.prompts import load_prompts

    try:
        load_prompts(config.sample.prompts)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.lora.init_from and not os.path.exists(config.lora.init_from):
        raise ConfigError(f"lora.init_from: {config.lora.init_from!r} does not exist; give a LoRA .safetensors file or folder")
    if config.lora.init_from:
        check_lora_file(config)
    check_memory(config)
    problem = compile_problem(config.model.device) if config.model.compile else None
    if problem:
        raise ConfigError(problem)
    run = RunDir(run_uri)
    if not resuming and latest_checkpoint(run) is not None:
        raise ConfigError(
            f"run.name: {run_uri} already holds a run; resume it with --resume {run_uri} or pick another run.name"
        )
    try:
        run.check_writable()
    except PermissionError as error:
        raise ConfigError(str(error)) from None
    folder = model_folder(config)  # the model is on disk (never downloaded)
    check_target_modules(config, folder)
    check_family_settings(config, folder)


def main(argv: list[str] | None = None) -> int:
    # transformers announces optional backends it lacks (torchvision) on import; not our users' concern.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config, run_uri = resolve_config(args)
        preflight(config, run_uri, resuming=bool(args.resume))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from dense_rl.config import RunFailed
    from dense_rl.run.heldout import BEST
    from dense_rl.run.storage import RunDir

    try:
        if args.in_process:  # the same run directory, without Ray
            from dense_rl.training.trainer import train

            history = train(config, run_uri=run_uri, show_progress=not args.quiet)
        else:
            from dense_rl.system.session import run_system

            history = run_system(config, run_uri, show_progress=not args.quiet, verbose=args.verbose)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:  # checkpoints already written stay; the run continues from the newest
        print(f"error: {error}; the run's checkpoints are kept: fix this, then --resume {run_uri}", file=sys.stderr)
        return 1
    if history:
        first, last = history[0], history[-1]
        if last.get("stopped_by"):
            print(f"stopped: {last['stopped_by']}")
        print(f"done: {run_uri}  reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f} "
              f"over {last['samples_seen']} samples; see reward_curve.png and images/")
        best = RunDir(run_uri).read_json(BEST) if RunDir(run_uri).exists(BEST) else None
        if best is not None:
            print(f"best checkpoint (every guard satisfied, highest held-out reward): {run_uri}/{best['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
