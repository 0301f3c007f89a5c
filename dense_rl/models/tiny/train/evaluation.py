"""Score a tiny text-to-image sampler with the shipped tiny reward models (shared by the DDIM and the
flow model's pretraining scripts).

A sampler is any ``sample_fn(prompts, guidance_scale, seed) -> images float32 [B,3,16,16] in [0,1]``.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from dense_rl.models.tiny.data import COLOR_NAMES, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption, parse_prompt

SampleFn = Callable[[list[str], float, int], torch.Tensor]


def eval_prompts(per_combo: int, templates=TRAIN_TEMPLATES + HELDOUT_TEMPLATES) -> list[str]:
    """``per_combo`` prompts per digit x colour, cycling over the templates."""
    prompts = []
    k = 0
    for _ in range(per_combo):
        for d in range(10):
            for c in COLOR_NAMES:
                prompts.append(caption(d, c, templates[k % len(templates)]))
                k += 1
    return prompts


@torch.no_grad()
def evaluate_sampler(sample_fn: SampleFn, guidance_scales, per_combo: int = 5, seed: int = 1234,
                     rewards_dir: str | None = None) -> dict:
    """Digit/colour accuracy (the shipped classifier), preference and true quality of the samples at each
    guidance scale, plus the preference model's scores of real digits for comparison."""
    from dense_rl.models.tiny.data import load_gray_digits
    from dense_rl.models.tiny.train.rewards import best_variant, colorize_idx, poor_variant, true_quality
    from dense_rl.rewards.tiny import DigitAlignmentReward, PreferenceReward

    cls_path = os.path.join(rewards_dir, "digit_classifier.safetensors") if rewards_dir else None
    pref_path = os.path.join(rewards_dir, "preference.safetensors") if rewards_dir else None
    align = DigitAlignmentReward(cls_path)
    pref = PreferenceReward(pref_path)
    prompts = eval_prompts(per_combo)
    targets = [parse_prompt(p) for p in prompts]
    y_digit = torch.tensor([d for d, _ in targets])
    y_color = torch.tensor([COLOR_NAMES.index(c) for _, c in targets])
    heldout = torch.tensor([any(p == caption(d, c, t) for t in HELDOUT_TEMPLATES) for p, (d, c) in zip(prompts, targets)])
    results = {"n_samples": len(prompts), "per_guidance": {}}
    for g in guidance_scales:
        t0 = time.time()
        imgs = sample_fn(prompts, g, seed)
        dp, cp = align.predict(imgs)
        dig_ok = dp.argmax(1) == y_digit
        col_ok = cp.argmax(1) == y_color
        results["per_guidance"][str(g)] = {
            "digit_acc": dig_ok.float().mean().item(),
            "color_acc": col_ok.float().mean().item(),
            "both_acc": (dig_ok & col_ok).float().mean().item(),
            "digit_acc_heldout_template": dig_ok[heldout].float().mean().item(),
            "alignment_reward_mean": align(imgs, prompts).mean().item(),
            "preference_mean": pref(imgs, prompts).mean().item(),
            "true_quality_mean": true_quality(imgs).mean().item(),
            "sample_seconds": round(time.time() - t0, 1),
        }
    gray, _ = load_gray_digits(16)
    cols = torch.arange(gray.shape[0]) % len(COLOR_NAMES)
    for name, g in [("raw", gray), ("best", best_variant(gray)), ("poor", poor_variant(gray))]:
        rgb = colorize_idx(g, cols)
        results[f"preference_mean_{name}_real_digits"] = pref(rgb, [""] * len(rgb)).mean().item()
        results[f"true_quality_mean_{name}_real_digits"] = true_quality(rgb).mean().item()
    return results
