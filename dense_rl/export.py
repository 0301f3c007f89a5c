"""`python -m dense_rl.export RUN_DIR --checkpoint best|latest|N --out DIR`: a run's LoRA as diffusers loads it.

    python -m dense_rl.export runs/tiny --checkpoint best --out lora/
    # then: pipe.load_lora_weights("lora/")   (StableDiffusionPipeline or StableDiffusion3Pipeline)

Writes OUT/pytorch_lora_weights.safetensors (the file carries its LoraConfig, so diffusers applies it at
the trained alpha) and OUT/dense_rl_export.json (the run, the checkpoint, its policy version and, for
`best`, its held-out scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dense_rl.config import ConfigError
from dense_rl.evaluate import choose_checkpoints
from dense_rl.run.checkpoints import LORA_FILE
from dense_rl.run.heldout import read_best
from dense_rl.run.storage import CONFIG_FILE, RunDir


def export(run_uri: str, which: str, out: str) -> Path:
    run = RunDir(run_uri)
    if not run.exists(CONFIG_FILE):
        raise ConfigError(f"RUN_DIR: {run.uri} is not a dense_rl run (no {CONFIG_FILE}); pass a run's directory")
    if which not in ("best", "latest") and not which.isdigit():
        raise ConfigError(f"--checkpoint: {which!r} is not best, latest or a policy version such as 4")
    chosen = choose_checkpoints(run, which)
    if not chosen:
        raise ConfigError(f"--checkpoint: {run.uri} has no checkpoint yet")
    (version, folder), = chosen.items()
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    (target / LORA_FILE).write_bytes(run.read_bytes(f"{folder}/{LORA_FILE}"))
    best = read_best(run) if which == "best" else None
    about = {"run": run.uri, "checkpoint": folder, "policy_version": version, "heldout_scores": best and best["scores"]}
    (target / "dense_rl_export.json").write_text(json.dumps(about, indent=1, sort_keys=True))
    return target / LORA_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dense_rl.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--checkpoint", default="best", help="best (default; best.json), latest, or a policy version")
    parser.add_argument("--out", required=True, help="folder to write pytorch_lora_weights.safetensors into")
    args = parser.parse_args(argv)
    try:
        path = export(args.run_dir, args.checkpoint, args.out)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
