"""Benchmarks: `python -m dense_rl.bench <name>` (sample-efficiency, throughput, scaling).

Each benchmark writes `results.json` and PNG plots to its `--out` folder and prints a table of the
ratios it measured in that one run. Nothing here asserts a time."""
