"""Train the tiny world's reward models and write them to ``dense_rl/assets/rewards/``.

    python -m dense_rl.models.tiny.train.rewards [--out DIR] [--seed 0]

1. ``digit_classifier``: a small two-headed CNN (10 digits, 6 colours) trained on coloured digits
   with light augmentation (sub-pixel shifts, stroke thickness, blur/sharpen, contrast, noise,
   colour jitter) so that it is robust to generated images.
2. ``preference``: a small CNN scalar scorer trained with a Bradley-Terry loss on synthetic pairs.
   Variants of real digits differ in boldness, centring, contrast, sharpness and noise; a hidden
   "true quality" (:func:`true_quality`, a weighted sum of properties measured on the image) sets
   the label probability P(a preferred over b) = sigmoid(q_a - q_b). This is the tiny world's
   analogue of a human-preference model (HPSv2): the base text-to-image model imitates the raw
   data, whose quality sits well below the best (bold, centred, crisp, full-contrast) renders.

Both use only the training split of the source digits; metrics are on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dense_rl import ASSETS
from dense_rl.models.tiny.data import COLOR_NAMES, color_tensor, load_gray_digits, source_split
from dense_rl.models.tiny.nets import DigitColorNet, PreferenceNet, save_net

DEFAULT_OUT = ASSETS / "rewards"

# ----------------------------------------------------------------------------------------------
# Image operations on stroke intensity [N,1,H,W] (or RGB [N,3,H,W]) in [0,1]. All vectorised.
# ----------------------------------------------------------------------------------------------


def _per_sample(v, n: int, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.expand(n).reshape(n, 1, 1, 1) if v.dim() == 0 else v.reshape(n, 1, 1, 1)


def dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def erode(x: torch.Tensor) -> torch.Tensor:
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


def thicken(x: torch.Tensor, t) -> torch.Tensor:
    """t in [-1, 1] per sample: >0 blends toward a 3x3 dilation (bolder), <0 toward erosion."""
    t = _per_sample(t, x.shape[0], x)
    return torch.where(t >= 0, x + t * (dilate(x) - x), x + (-t) * (erode(x) - x))


def blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur with zero (black) padding."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4.0
    k2 = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x, k2, padding=1, groups=x.shape[1])


def sharpen_blur(x: torch.Tensor, s) -> torch.Tensor:
    """s in [-1, 1] per sample: >0 blends toward a crisp (sigmoid-thresholded) stroke, <0 toward a blur."""
    s = _per_sample(s, x.shape[0], x)
    peak = x.flatten(1).amax(1).clamp_min(1e-3).reshape(-1, 1, 1, 1)
    crisp = peak * torch.sigmoid((x / peak - 0.45) * 14.0)
    soft = blur(blur(x))
    return torch.where(s >= 0, x + s * (crisp - x), x + (-s) * (soft - x))


def translate(x: torch.Tensor, dx, dy, mode: str = "bilinear") -> torch.Tensor:
    """Shift by (dx, dy) pixels per sample (right/down positive), black fill."""
    n, _, h, w = x.shape
    dx = torch.as_tensor(dx, dtype=x.dtype).expand(n)
    dy = torch.as_tensor(dy, dtype=x.dtype).expand(n)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * dx / w
    theta[:, 1, 2] = -2.0 * dy / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def centroid(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensity-weighted centre (cy, cx) in pixel coordinates of [N,1,H,W]."""
    w = gray[:, 0]
    h, wd = w.shape[-2:]
    s = w.sum((1, 2)).clamp_min(1e-6)
    cy = (w.sum(2) * torch.arange(h, dtype=w.dtype)).sum(1) / s
    cx = (w.sum(1) * torch.arange(wd, dtype=w.dtype)).sum(1) / s
    return cy, cx


def center(gray: torch.Tensor) -> torch.Tensor:
    """Move each image's intensity centroid to the image centre (integer shift, no blur)."""
    cy, cx = centroid(gray)
    h, w = gray.shape[-2:]
    return translate(gray, torch.round((w - 1) / 2 - cx), torch.round((h - 1) / 2 - cy), mode="nearest")


# ----------------------------------------------------------------------------------------------
# The hidden "true quality" of the preference world.
# ----------------------------------------------------------------------------------------------

MASS_TARGET = 0.40  # the ideal fraction of ink: bolder than the data (median 0.31), not a blob.
QUALITY_WEIGHTS = {
    "bold": 1.0 / 0.07,       # -|mass - MASS_TARGET|
    "centred": 1.0 / 0.8,     # -distance of the ink centroid from the image centre (pixels)
    "contrast": 1.0 / 0.15,   # +98th-percentile brightness (peak stroke intensity)
    "sharp": 1.0 / 0.35,      # -"grey-ness": mean 4g(1-g) per unit of ink (blurred edges are grey)
    "clean": 1.0 / 0.02,      # -mean |g - median3x3(g)| (speckle noise)
}


def _median3(g: torch.Tensor) -> torch.Tensor:
    n, _, h, w = g.shape
    patches = F.unfold(F.pad(g, (1, 1, 1, 1), mode="replicate"), 3)  # [N,9,H*W]
    return patches.median(dim=1).values.reshape(n, 1, h, w)


def quality_features(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Measurable properties of RGB images [N,3,16,16] in [0,1] (stroke intensity = channel max)."""
    g = images.float().clamp(0, 1).amax(1, keepdim=True)
    mass = g.mean((1, 2, 3))
    cy, cx = centroid(g)
    h, w = g.shape[-2:]
    offset = torch.sqrt((cy - (h - 1) / 2) ** 2 + (cx - (w - 1) / 2) ** 2)
    peak = g.flatten(1).quantile(0.98, dim=1)
    grey = (4 * g * (1 - g)).mean((1, 2, 3)) / mass.clamp_min(0.02)
    noise = (g - _median3(g)).abs().mean((1, 2, 3))
    return {"mass": mass, "offset": offset, "peak": peak, "grey": grey, "noise": noise}


def true_quality(images: torch.Tensor) -> torch.Tensor:
    """Hidden quality q (higher is better) of RGB images [N,3,16,16]; P(a > b) = sigmoid(q_a - q_b)."""
    f = quality_features(images)
    W = QUALITY_WEIGHTS
    return (
        -W["bold"] * (f["mass"] - MASS_TARGET).abs()
        - W["centred"] * f["offset"]
        + W["contrast"] * (f["peak"] - 1.0)
        - W["sharp"] * f["grey"]
        - W["clean"] * f["noise"]
    )


def best_variant(gray: torch.Tensor) -> torch.Tensor:
    """A top-quality render of real digits [N,1,H,W]: centred, bolder, crisp, full contrast."""
    x = center(gray)
    x = thicken(x, 0.35)
    x = sharpen_blur(x, 1.0)
    return (x / x.flatten(1).amax(1).clamp_min(1e-3).reshape(-1, 1, 1, 1)).clamp(0, 1)


def poor_variant(gray: torch.Tensor, shift: float = 3.0) -> torch.Tensor:
    """A thin, off-centre, dim render of real digits [N,1,H,W]."""
    x = thicken(gray, -1.0)
    x = translate(x, shift, shift, mode="nearest")
    return (0.35 * x).clamp(0, 1)


def random_variants(gray: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random quality variants of gray digits -> RGB [N,3,H,W] with random colours."""
    n = gray.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    def on(p):
        return (torch.rand(n, generator=gen) < p).float()

    x = thicken(gray, u(-1.0, 1.0) * on(0.7))
    x = sharpen_blur(x, u(-1.0, 1.0) * on(0.7))
    shift = on(0.6)
    x = translate(x, torch.round(u(-3.5, 3.5)) * shift, torch.round(u(-3.5, 3.5)) * shift, mode="nearest")
    c = torch.where(on(0.6) > 0, u(0.3, 1.3), torch.ones(n))
    x = (x * c.reshape(n, 1, 1, 1)).clamp(0, 1)
    colors = torch.randint(0, len(COLOR_NAMES), (n,), generator=gen)
    rgb = x * color_tensor(COLOR_NAMES)[colors][:, :, None, None]
    sigma = u(0.0, 0.25) * on(0.5)
    rgb = rgb + sigma.reshape(n, 1, 1, 1) * torch.randn(rgb.shape, generator=gen)
    return rgb.clamp(0, 1)


def classifier_augment(gray: torch.Tensor, colors: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation for the digit/colour classifier -> RGB [N,3,H,W]."""
    n = gray.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    x = thicken(gray, u(-0.8, 0.8))
    x = sharpen_blur(x, u(-0.8, 0.8))
    x = translate(x, u(-2.0, 2.0), u(-2.0, 2.0), mode="bilinear")
    x = (x * u(0.45, 1.25).reshape(n, 1, 1, 1)).clamp(0, 1)
    base = color_tensor(COLOR_NAMES)[colors]
    # colour jitter: dim the lit channels a little and leak a little into the dark ones
    jitter = torch.where(base > 0, 1.0 - 0.25 * torch.rand(n, 3, generator=gen), 0.2 * torch.rand(n, 3, generator=gen))
    rgb = x * jitter[:, :, None, None]
    sigma = u(0.0, 0.12)
    rgb = rgb + sigma.reshape(n, 1, 1, 1) * torch.randn(rgb.shape, generator=gen)
    return rgb.clamp(0, 1)


def colorize_idx(gray: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    return gray * color_tensor(COLOR_NAMES)[colors][:, :, None, None]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate_classifier(net: DigitColorNet, gray: torch.Tensor, digits: torch.Tensor,
                        gen: torch.Generator | None = None) -> dict[str, float]:
    """Accuracy on every test digit in every colour (clean), and on an augmented copy if gen is given."""
    net.eval()
    k = len(COLOR_NAMES)
    g = gray.repeat_interleave(k, 0)
    y = digits.repeat_interleave(k, 0)
    c = torch.arange(k).repeat(gray.shape[0])
    out = {}
    for name, imgs in [("clean", colorize_idx(g, c))] + ([("augmented", classifier_augment(g, c, gen))] if gen else []):
        dl, cl = net(imgs)
        out[f"digit_acc_{name}"] = (dl.argmax(1) == y).float().mean().item()
        out[f"color_acc_{name}"] = (cl.argmax(1) == c).float().mean().item()
    return out


def train_classifier(gray_tr, y_tr, gray_te, y_te, steps: int, batch_size: int, seed: int) -> tuple[DigitColorNet, dict]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitColorNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    n = gray_tr.shape[0]
    bar = tqdm(range(steps), desc="digit classifier", mininterval=2.0)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = _cosine_lr(step, steps, 2e-3)
        net.train()
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        colors = torch.randint(0, len(COLOR_NAMES), (batch_size,), generator=gen)
        x = classifier_augment(gray_tr[idx], colors, gen)
        dl, cl = net(x)
        loss = F.cross_entropy(dl, y_tr[idx], label_smoothing=0.05) + F.cross_entropy(cl, colors, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics = evaluate_classifier(net, gray_te, y_te, torch.Generator().manual_seed(seed + 1))
    net.eval()
    return net, metrics


@torch.no_grad()
def evaluate_preference(net: PreferenceNet, gray_te: torch.Tensor, seed: int, n_pairs: int = 4000) -> dict[str, float]:
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, gray_te.shape[0], (n_pairs,), generator=gen)
    a = random_variants(gray_te[idx], gen)
    b = random_variants(gray_te[idx], gen)
    qa, qb = true_quality(a), true_quality(b)
    sa, sb = net(a), net(b)
    labels = (torch.rand(n_pairs, generator=gen) < torch.sigmoid(qa - qb)).float()
    pred = (sa > sb).float()
    true_order = (qa > qb).float()
    q = torch.cat([qa, qb])
    s = torch.cat([sa, sb])
    rank_q = q.argsort().argsort().float()
    rank_s = s.argsort().argsort().float()
    spearman = torch.corrcoef(torch.stack([rank_q, rank_s]))[0, 1].item()
    best = best_variant(gray_te)
    poor = poor_variant(gray_te)
    k = len(COLOR_NAMES)
    cols = torch.arange(gray_te.shape[0]) % k
    raw_rgb = colorize_idx(gray_te, cols)
    best_rgb = colorize_idx(best, cols)
    poor_rgb = colorize_idx(poor, cols)
    s_raw, s_best, s_poor = net(raw_rgb), net(best_rgb), net(poor_rgb)
    return {
        "pair_acc_vs_true_order": (pred == true_order).float().mean().item(),
        "pair_acc_vs_sampled_labels": (pred == labels).float().mean().item(),
        "bayes_acc_vs_sampled_labels": (true_order == labels).float().mean().item(),
        "spearman_score_vs_true_quality": spearman,
        "score_mean_raw_digits": s_raw.mean().item(),
        "score_mean_best_variants": s_best.mean().item(),
        "score_mean_poor_variants": s_poor.mean().item(),
        "quality_mean_raw_digits": true_quality(raw_rgb).mean().item(),
        "quality_mean_best_variants": true_quality(best_rgb).mean().item(),
        "quality_mean_poor_variants": true_quality(poor_rgb).mean().item(),
        "best_beats_raw_frac": (s_best > s_raw).float().mean().item(),
        "best_beats_poor_frac": (s_best > s_poor).float().mean().item(),
    }


def train_preference(gray_tr, gray_te, steps: int, batch_size: int, seed: int) -> tuple[PreferenceNet, dict]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PreferenceNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    n = gray_tr.shape[0]
    bar = tqdm(range(steps), desc="preference (Bradley-Terry)", mininterval=2.0)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = _cosine_lr(step, steps, 1e-3)
        net.train()
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        a = random_variants(gray_tr[idx], gen)
        b = random_variants(gray_tr[idx], gen)
        with torch.no_grad():
            p = torch.sigmoid(true_quality(a) - true_quality(b))
            y = (torch.rand(batch_size, generator=gen) < p).float()  # sampled human-like labels
        logits = net(a) - net(b)  # Bradley-Terry: P(a > b) = sigmoid(r(a) - r(b))
        loss = F.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics = evaluate_preference(net, gray_te, seed + 1)
    return net, metrics


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the shipped assets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--preference-steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--only", choices=["classifier", "preference"], default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; try 1 when other jobs share the cores)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gray, digits = load_gray_digits(16)
    tr, te = source_split()
    gray_tr, y_tr, gray_te, y_te = gray[tr], digits[tr], gray[te], digits[te]
    results = {}
    if args.only in (None, "classifier"):
        t0 = time.time()
        net, m = train_classifier(gray_tr, y_tr, gray_te, y_te, args.classifier_steps, args.batch_size, args.seed)
        m["train_seconds"] = round(time.time() - t0, 1)
        meta = {"seed": args.seed, "steps": args.classifier_steps, "batch_size": args.batch_size,
                "input": "RGB [B,3,16,16] in [0,1]", "colors": list(COLOR_NAMES),
                "heldout_metrics": {k: round(v, 4) for k, v in m.items()}}
        save_net(net, out / "digit_classifier.safetensors", meta)
        results["digit_classifier"] = m
        print("digit classifier:", json.dumps({k: round(v, 4) for k, v in m.items()}))
    if args.only in (None, "preference"):
        t0 = time.time()
        net, m = train_preference(gray_tr, gray_te, args.preference_steps, args.batch_size, args.seed)
        m["train_seconds"] = round(time.time() - t0, 1)
        meta = {"seed": args.seed, "steps": args.preference_steps, "batch_size": args.batch_size,
                "input": "RGB [B,3,16,16] in [0,1]", "loss": "Bradley-Terry on sampled labels",
                "quality_weights": QUALITY_WEIGHTS, "mass_target": MASS_TARGET,
                "heldout_metrics": {k: round(v, 4) for k, v in m.items()}}
        save_net(net, out / "preference.safetensors", meta)
        results["preference"] = m
        print("preference:", json.dumps({k: round(v, 4) for k, v in m.items()}))
    return results


if __name__ == "__main__":
    main()
