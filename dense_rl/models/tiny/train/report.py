"""Reporting for the tiny model: the labelled sample grid and the model card (README.md)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dense_rl.models.tiny import DEFAULT_NUM_STEPS
from dense_rl.models.tiny.data import ALL_TEMPLATES, COLOR_NAMES, SPECIAL_TOKENS, VOCAB


def save_grid(images: torch.Tensor, path: Path, row_labels: list[str], col_labels: list[str], title: str, cell: int = 64) -> None:
    """images [R*C,3,16,16] row-major -> a labelled PNG grid, upscaled with nearest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, c = len(row_labels), len(col_labels)
    big = F.interpolate(images, size=(cell, cell), mode="nearest")
    pad = 4
    canvas = torch.ones(3, r * (cell + pad) + pad, c * (cell + pad) + pad) * 0.35
    for i in range(r):
        for j in range(c):
            y0, x0 = pad + i * (cell + pad), pad + j * (cell + pad)
            canvas[:, y0:y0 + cell, x0:x0 + cell] = big[i * c + j]
    arr = canvas.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(arr.shape[1] / 72 + 1.2, arr.shape[0] / 72 + 0.9), dpi=100)
    ax.imshow(arr, interpolation="nearest")
    ax.set_xticks([pad + j * (cell + pad) + cell / 2 for j in range(c)], col_labels)
    ax.set_yticks([pad + i * (cell + pad) + cell / 2 for i in range(r)], row_labels)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=9, pad=24)
    for s in ax.spines.values():
        s.set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def write_model_card(out: Path, args, info: dict, metrics: dict, n_params: dict, size_mb: float,
                     caption_dropout: float) -> None:
    hp = {k: info.get(k, getattr(args, k)) for k in ("steps", "batch_size", "seed", "lr", "ema_decay")}
    g = str(args.guidance_scale)
    m = metrics["per_guidance"][g]
    rows = "\n".join(
        f"| {gs} | {_fmt(v['digit_acc'])} | {_fmt(v['color_acc'])} | {_fmt(v['both_acc'])} | "
        f"{_fmt(v['preference_mean'])} |"
        for gs, v in metrics["per_guidance"].items()
    )
    text = f"""# tiny-t2i: the embedded tiny text-to-image model of dense_rl

A pixel-space `StableDiffusionPipeline` without a VAE that draws 16x16 coloured handwritten digits
from text prompts such as "a red digit seven" or "the number 7 in blue". It exists so the whole RL
system can run, and be tested, on a laptop CPU with no hub download.

- **Data**: scikit-learn's 8x8 handwritten digits (1797 images), upsampled bilinearly to 16x16 and
  drawn in one of six colours ({", ".join(COLOR_NAMES)}) on black; every image in every colour
  (10,782 images). Captions from {len(ALL_TEMPLATES)} templates (all used in pretraining):
  {"; ".join(repr(t) for t in ALL_TEMPLATES)}. The last one is held out of RL training prompts.
- **Pixel convention**: the diffusion sample x in [-1, 1] is the image: `image = (x.clamp(-1, 1) + 1) / 2`.
- **Tokenizer**: word-level ({len(VOCAB) + len(SPECIAL_TOKENS)} tokens), `[BOS] words [EOS]`, padded with `[PAD]` to 16.
- **Text encoder**: `CLIPTextModel`, 2 layers, width 64, 4 heads ({n_params['text_encoder']:,} parameters).
- **UNet**: `UNet2DConditionModel`, channels (32, 64, 64), cross-attention at 8x8 and 4x4 and in the
  mid block, cross_attention_dim 64 ({n_params['unet']:,} parameters).
- **Scheduler**: `DDIMScheduler`, 1000 steps, `squaredcos_cap_v2`, epsilon prediction,
  set_alpha_to_one False, leading spacing with steps_offset 1. clip_sample is False because
  `StableDiffusionPipeline` forces it off when it is built or loaded; final samples are clamped to [-1, 1].
- **Training**: from scratch, epsilon-prediction MSE with min-SNR-5 weighting, random template per
  image, {int(caption_dropout * 100)}% caption dropout to "" (classifier-free guidance uses "" as the negative
  prompt), AdamW lr {hp['lr']} (100 warmup steps, cosine to 10%), grad-norm clip 1, batch {hp['batch_size']},
  {hp['steps']} steps, EMA {hp['ema_decay']} (the EMA weights are saved), seed {hp['seed']}. Training took
  {info['train_seconds']:.0f} s wall-clock on a shared 2-core CPU (about 0.36 s a step when the cores are free).
- **Size**: {size_mb:.1f} MB of fp32 safetensors.

Rebuild (train the reward models first, they are used to evaluate; on 2 free CPU cores about 4 minutes
for the rewards, then 7 minutes of training plus 1-2 of evaluation; longer when the cores are shared):

    python -m dense_rl.models.tiny.train.rewards
    python -m dense_rl.models.tiny.train.pretrain --steps {hp['steps']} --batch-size {hp['batch_size']} --seed {hp['seed']} --lr {hp['lr']}

## Recommended sampling

DDIM, {DEFAULT_NUM_STEPS} steps, eta 1.0, guidance scale {args.guidance_scale}, negative prompt "". Keep
`clip_sample` off (the saved default): clipping the predicted x0 every step makes samples worse.

## Measured

{metrics['n_samples']} samples (every digit x colour, {metrics['n_samples'] // 60} each, prompts cycling over all
templates), DDIM {DEFAULT_NUM_STEPS} steps, eta 1, scored by the shipped tiny reward models
(`dense_rl/assets/rewards/`):

| guidance | digit acc | colour acc | both | preference mean |
|---|---|---|---|---|
{rows}

At guidance {g}: digit accuracy {_fmt(m['digit_acc'])} (held-out template: {_fmt(m['digit_acc_heldout_template'])}),
colour accuracy {_fmt(m['color_acc'])}.

Preference model on real digits for comparison: raw data {_fmt(metrics['preference_mean_raw_real_digits'])},
best variants (centred, bolder, crisp, full contrast) {_fmt(metrics['preference_mean_best_real_digits'])},
poor variants (thin, shifted, dim) {_fmt(metrics['preference_mean_poor_real_digits'])}.
"""
    (out / "README.md").write_text(text)
