"""Pictures a person looks at: the epoch's image grid and the reward curve."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def image_grid_png(images: torch.Tensor, columns: int = 8, min_cell: int = 64) -> bytes:
    """uint8 [N, 3, H, W] -> PNG bytes of a grid; small images are enlarged with nearest neighbour."""
    count, _, height, width = images.shape
    scale = max(1, math.ceil(min_cell / max(height, width)))
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * width * scale + columns - 1, rows * height * scale + rows - 1), (40, 40, 40))
    for i, image in enumerate(images):
        tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width * scale, height * scale), Image.NEAREST)
        grid.paste(tile, ((i % columns) * (width * scale + 1), (i // columns) * (height * scale + 1)))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def reward_curve_png(samples_seen: list[int], reward_mean: list[float], reward_std: list[float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, mean, std = np.asarray(samples_seen), np.asarray(reward_mean), np.asarray(reward_std)
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=110)
    axis.plot(x, mean, marker="o", markersize=3, label="mean reward")
    axis.fill_between(x, mean - std, mean + std, alpha=0.2, label="± 1 std")
    axis.set_xlabel("samples seen")
    axis.set_ylabel("reward")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def run_summary_png(run_uri: str) -> bytes:
    """The run's last image grid beside its reward curve: the picture in the README."""
    from dense_rl.run.storage import RunDir

    run = RunDir(run_uri)
    epochs = sorted(row["epoch"] for row in run.read_table("metrics.parquet"))
    grid = Image.open(io.BytesIO(run.read_bytes(f"images/epoch-{epochs[-1]:04d}.png"))).convert("RGB")
    curve = Image.open(io.BytesIO(run.read_bytes("reward_curve.png"))).convert("RGB")
    grid = grid.resize((round(grid.width * curve.height / grid.height), curve.height), Image.NEAREST)
    canvas = Image.new("RGB", (grid.width + curve.width + 10, curve.height), (255, 255, 255))
    canvas.paste(grid, (0, 0))
    canvas.paste(curve, (grid.width + 10, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m dense_rl.run.plots RUN_DIR OUT.png")
    with open(sys.argv[2], "wb") as out:
        out.write(run_summary_png(sys.argv[1]))
