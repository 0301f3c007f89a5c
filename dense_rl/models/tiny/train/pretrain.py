"""Pretrain the embedded tiny text-to-image model and save it in the diffusers layout.

    python -m dense_rl.models.tiny.train.pretrain [--steps N] [--batch-size B] [--seed S] [--out DIR]

A pixel-space ``StableDiffusionPipeline`` without a VAE: a word-level tokenizer, a tiny
``CLIPTextModel`` and a small ``UNet2DConditionModel`` on 16x16 RGB, trained jointly from scratch
on captioned coloured digits (:mod:`dense_rl.models.tiny.data`) with the epsilon-prediction loss,
caption dropout (for classifier-free guidance with the empty prompt as the negative) and an EMA of
the weights (the EMA weights are what is saved). The diffusion sample x in [-1, 1] is the image:
``image = (x.clamp(-1, 1) + 1) / 2``.

After training it evaluates the model with its own DDIM(eta=1) + CFG sampler against the shipped
digit classifier and preference model, writes a sample grid to ``docs/tiny_samples.png`` and a model
card (README.md) into the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dense_rl import ASSETS
from dense_rl.models.tiny import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS
from dense_rl.models.tiny.data import (
    ALL_TEMPLATES,
    COLOR_NAMES,
    DIGIT_WORDS,
    MAX_LENGTH,
    SPECIAL_TOKENS,
    TRAIN_TEMPLATES,
    VOCAB,
    caption,
    colored_digits,
)
from dense_rl.models.tiny.train.evaluation import eval_prompts, evaluate_sampler  # noqa: F401 (eval_prompts: re-export)
from dense_rl.models.tiny.train.report import save_grid, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_OUT = ASSETS / "tiny-t2i"
DEFAULT_GRID = REPO_ROOT / "docs" / "tiny_samples.png"

CAPTION_DROPOUT = 0.1


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------


def build_tokenizer():
    """Word-level tokenizer over :data:`VOCAB`: "[BOS] words [EOS]", padded with [PAD] (id 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
        unk_token="[UNK]", model_max_length=MAX_LENGTH,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # 16, 8, 4 px
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    # clip_sample is False because StableDiffusionPipeline forces it to False on construction and on
    # from_pretrained (a latent-space assumption); samples are clamped to [-1, 1] when decoded.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
        clip_sample_range=1.0, set_alpha_to_one=False, prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=1,
    )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------
# Sampling (DDIM + classifier-free guidance), self-contained for evaluation and the sample grid
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(unet, text_encoder, tokenizer, scheduler, prompts: list[str], *, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
           num_steps: int = DEFAULT_NUM_STEPS, eta: float = 1.0, seed: int = 0, batch_size: int = 256,
           clip_sample: bool | None = None) -> torch.Tensor:
    """Sample images float32 [B,3,16,16] in [0,1] for ``prompts`` (negative prompt: "").

    ``clip_sample`` overrides the scheduler's setting (clip the predicted x0 to [-1, 1] every step).
    """
    from diffusers import DDIMScheduler

    extra = {} if clip_sample is None else {"clip_sample": clip_sample}
    sched = DDIMScheduler.from_config(scheduler.config, **extra)
    sched.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(seed)
    unet.eval()
    text_encoder.eval()
    size = unet.config.sample_size
    uncond = text_encoder(tokenize(tokenizer, [""]))[0]
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        cond = text_encoder(tokenize(tokenizer, chunk))[0]
        x = torch.randn(n, unet.config.in_channels, size, size, generator=gen)
        use_cfg = guidance_scale != 1.0
        ctx = torch.cat([uncond.expand(n, -1, -1), cond]) if use_cfg else cond
        for t in sched.timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            eps = unet(inp, t, encoder_hidden_states=ctx).sample
            if use_cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            x = sched.step(eps, t, x, eta=eta, generator=gen).prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate(unet, text_encoder, tokenizer, scheduler, guidance_scales, per_combo: int = 5, seed: int = 1234,
             rewards_dir: str | None = None) -> dict:
    def sample_fn(prompts, guidance_scale, seed):
        return sample(unet, text_encoder, tokenizer, scheduler, prompts, guidance_scale=guidance_scale, seed=seed)

    return evaluate_sampler(sample_fn, guidance_scales, per_combo, seed=seed, rewards_dir=rewards_dir)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(steps: int, batch_size: int, seed: int, lr: float = 1e-3, ema_decay: float = 0.995,
          min_snr_gamma: float = 5.0, warmup: int = 100):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    scheduler = build_scheduler()

    images, digits, colors = colored_digits(size=16, seed=seed, split="all", colors="all")
    x_all = images * 2.0 - 1.0
    # every caption each image can get (all templates) plus the empty caption, tokenized once
    captions = [""] + [caption(d, c, t) for t in ALL_TEMPLATES for d in range(10) for c in COLOR_NAMES]
    ids = tokenize(tokenizer, captions)
    caption_index = {c: i for i, c in enumerate(captions)}
    cap_table = torch.tensor([[caption_index[caption(int(d), c, t)] for t in ALL_TEMPLATES]
                              for d, c in zip(digits.tolist(), colors)])  # [N, n_templates]

    alphas_cumprod = scheduler.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=min_snr_gamma) / snr  # min-SNR-gamma, epsilon prediction

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())

    unet.train()
    text_encoder.train()
    n = x_all.shape[0]
    losses = []
    t_start = time.time()
    bar = tqdm(range(steps), desc="tiny t2i", mininterval=2.0)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0 = x_all[idx]
        tmpl = torch.randint(0, len(ALL_TEMPLATES), (batch_size,), generator=gen)
        cap = cap_table[idx, tmpl]
        cap = torch.where(torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT, torch.zeros_like(cap), cap)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ctx = text_encoder(ids[cap])[0]
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        loss = ((pred - noise) ** 2).mean((1, 2, 3))
        loss = (loss * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    train_seconds = time.time() - t_start
    info = {"train_seconds": round(train_seconds, 1), "final_loss_avg100": float(np.mean(losses[-100:]))}
    return ema_unet.eval(), ema_text.eval(), tokenizer, scheduler, info


def save_pipeline(unet, text_encoder, tokenizer, scheduler, out: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    record_tokenizer_class(out, "tokenizer")


def record_tokenizer_class(out: Path, component: str) -> None:
    """Record the saved tokenizer `component` as PreTrainedTokenizerFast.

    transformers 5 records its new class name "TokenizersBackend"; the classic alias
    PreTrainedTokenizerFast loads the same tokenizer.json under transformers 4 and 5."""
    for path, key in ((out / "model_index.json", component), (out / component / "tokenizer_config.json", "tokenizer_class")):
        cfg = json.loads(path.read_text())
        if key == component:
            cfg[key] = ["transformers", "PreTrainedTokenizerFast"]
        else:
            cfg[key] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_saved(path: str | Path):
    """Reload the saved folder the way the project does; returns the pipeline."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(path), vae=None, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the shipped asset)")
    ap.add_argument("--grid", default=str(DEFAULT_GRID), help="sample grid PNG ('' to skip)")
    ap.add_argument("--rewards-dir", default=None, help="reward models for evaluation (default: shipped)")
    ap.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    ap.add_argument("--eval-guidance", default="1,2,4,7.5", help="comma-separated guidance scales to evaluate")
    ap.add_argument("--eval-per-combo", type=int, default=3, help="samples per digit x colour in evaluation (0: skip)")
    ap.add_argument("--eval-only", action="store_true",
                    help="skip training: re-evaluate the model already in --out (rewrites eval.json, README.md, grid)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; try 1 when other jobs share the cores)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    t_total = time.time()
    if args.eval_only:
        previous = out / "eval.json"
        info = json.loads(previous.read_text())["train"] if previous.is_file() else {"train_seconds": float("nan")}
    else:
        unet, text_encoder, tokenizer, scheduler, info = train(
            args.steps, args.batch_size, args.seed, lr=args.lr, ema_decay=args.ema_decay)
        print(f"trained in {info['train_seconds']:.0f} s; final loss {info['final_loss_avg100']:.4f}")
        info.update({"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
                     "ema_decay": args.ema_decay})
        save_pipeline(unet, text_encoder, tokenizer, scheduler, out)

    # reload exactly as the project does, and evaluate the reloaded copy
    pipe = load_saved(out)
    unet, text_encoder, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    n_params = {"unet": sum(p.numel() for p in unet.parameters()),
                "text_encoder": sum(p.numel() for p in text_encoder.parameters())}
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    metrics = {"per_guidance": {}, "n_samples": 0}
    if args.eval_per_combo > 0:
        scales = sorted({float(s) for s in args.eval_guidance.split(",")} | {args.guidance_scale})
        metrics = evaluate(unet, text_encoder, tokenizer, scheduler, scales, args.eval_per_combo,
                           rewards_dir=args.rewards_dir)
        print(json.dumps(metrics, indent=1))
        (out / "eval.json").write_text(json.dumps({"train": info, "eval": metrics}, indent=1) + "\n")
    if args.grid:
        prompts = [caption(d, c, TRAIN_TEMPLATES[0]) for d in range(10) for c in COLOR_NAMES]
        imgs = sample(unet, text_encoder, tokenizer, scheduler, prompts, guidance_scale=args.guidance_scale, seed=7)
        save_grid(imgs, Path(args.grid), list(DIGIT_WORDS), list(COLOR_NAMES),
                  f'tiny-t2i samples: "a <colour> digit <word>", DDIM {DEFAULT_NUM_STEPS} steps, eta 1, guidance {args.guidance_scale}')
    if metrics["per_guidance"]:
        write_model_card(out, args, info, metrics, n_params, size_mb, CAPTION_DROPOUT)
    print(f"done in {time.time() - t_total:.0f} s (training {info['train_seconds']:.0f} s)")
    return {"train": info, "eval": metrics}


if __name__ == "__main__":
    main()
