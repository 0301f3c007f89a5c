"""`python -m dense_rl.runs list|show NAME`: what the run registry knows.

    python -m dense_rl.runs list                       # runs under ./runs (the embedded registry)
    python -m dense_rl.runs list --output-dir s3://bucket/runs
    DENSE_RL_REDIS_URL=redis://redis:6379/0 python -m dense_rl.runs show my-run

With DENSE_RL_REDIS_URL set it reads Redis (password from the URL or DENSE_RL_REDIS_PASSWORD);
otherwise the `registry.json` of every run directory under --output-dir (default: runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dense_rl.run.registry import RegistryUnavailable, open_registry


def age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def list_lines(records: list[dict], now: float) -> list[str]:
    header = f"{'NAME':24} {'STATUS':9} {'EPOCH':>9} {'VERSION':>7} {'REWARD':>9} {'HEARTBEAT':>10}  CHECKPOINT  (BEST)"
    lines = [header]
    for r in records:  # .get: a record written by an older or newer dense_rl may lack a field
        reward = (r.get("metrics") or {}).get("reward_mean")
        heartbeat = r.get("heartbeat")
        lines.append(
            f"{r['name']:24} {r.get('status', '?'):9} {r.get('epoch', '?'):>4}/{r.get('num_epochs', '?'):<4} "
            f"{r.get('policy_version', '?'):>7} {'-' if reward is None else format(reward, '.4f'):>9} "
            f"{'-' if heartbeat is None else age(now - heartbeat):>10}  {r.get('checkpoint') or '-'}"
            + (f"  (best: {r['best']})" if r.get("best") else "")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output-dir", default="runs",
                        help="where the run directories are, without Redis (default: runs)")
    parser = argparse.ArgumentParser(prog="python -m dense_rl.runs", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="one line per run")
    show = commands.add_parser("show", parents=[common], help="the full record of one run, as JSON")
    show.add_argument("name")
    args = parser.parse_args(argv)

    registry = open_registry(args.output_dir)
    try:
        if args.command == "list":
            print("\n".join(list_lines(registry.list(), time.time())))
            return 0
        record = registry.get(args.name)
    except RegistryUnavailable as error:
        print(f"error: run registry unavailable: {error}", file=sys.stderr)
        return 1
    if record is None:
        print(f"error: no run named {args.name!r} in {registry.where}; see `python -m dense_rl.runs list`",
              file=sys.stderr)
        return 1
    print(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
