"""Pretrain the embedded tiny flow-matching (SD3-shaped) text-to-image model, in the diffusers layout.

    python -m dense_rl.models.tiny.train.pretrain_flow [--steps N] [--batch-size B] [--seed S] [--out DIR]

A pixel-space ``StableDiffusion3Pipeline`` without a VAE and without a T5: the word-level tokenizer of
the DDIM model (:func:`dense_rl.models.tiny.train.pretrain.build_tokenizer`, saved as both ``tokenizer`` and
``tokenizer_2``), two tiny ``CLIPTextModelWithProjection`` text encoders and a small
``SD3Transformer2DModel`` on 16x16 RGB, trained jointly from scratch on the captioned coloured digits
(:mod:`dense_rl.models.tiny.data`) with the rectified-flow loss: x_t = (1 - s) x0 + s noise at a
logit-normal sigma s (as SD3), the transformer (given timestep 1000 s) predicts the velocity
v = noise - x0. Caption dropout to "" (for classifier-free guidance with the empty prompt as the
negative) and an EMA of the weights (the EMA weights are what is saved). The diffusion sample x in
[-1, 1] is the image: ``image = (x.clamp(-1, 1) + 1) / 2``.

The text conditioning is exactly what ``StableDiffusion3Pipeline.encode_prompt`` computes for this
folder with ``max_sequence_length=0`` (no T5, so no zero T5 tokens): both encoders' penultimate
hidden states side by side [B, 16, 64] and their pooled projections side by side [B, 64].

After training it evaluates the reloaded model with its own Euler ODE + CFG sampler against the shipped
digit classifier and preference model, writes a sample grid to ``docs/tiny_flow_samples.png`` and a
model card (README.md) into the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dense_rl import ASSETS
from dense_rl.models.tiny.data import (
    ALL_TEMPLATES,
    COLOR_NAMES,
    DIGIT_WORDS,
    SPECIAL_TOKENS,
    TRAIN_TEMPLATES,
    VOCAB,
    caption,
    colored_digits,
)
from dense_rl.models.tiny.train.evaluation import evaluate_sampler
from dense_rl.models.tiny.train.pretrain import _lr_at, build_tokenizer, record_tokenizer_class, tokenize
from dense_rl.models.tiny.train.report import save_grid

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_OUT = ASSETS / "tiny-flow-t2i"
DEFAULT_GRID = REPO_ROOT / "docs" / "tiny_flow_samples.png"

CAPTION_DROPOUT = 0.1
# Recommended sampling for the shipped flow model (its README.md has the measurements).
DEFAULT_NUM_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 4.0

TEXT_WIDTH = 32  # each CLIP encoder; the transformer sees both side by side (joint_attention_dim 64)
TEXT_PROJECTION = 32  # each CLIP projection; pooled_projection_dim 64


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=TEXT_PROJECTION,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer():
    """SD3's MMDiT: 16x16 RGB in 2x2 patches (64 image tokens) attending jointly with 16 text tokens."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
        attention_head_dim=16, num_attention_heads=4,  # width 64
        joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=64, pooled_projection_dim=2 * TEXT_PROJECTION,
        pos_embed_max_size=8,  # 8x8 patches; the fixed sin-cos table is cropped to it
    )
    # adaLN-Zero (DiT): every block starts as the identity and the output as zero; trains faster from scratch.
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
                module.weight.zero_()
                module.bias.zero_()
    return model


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # shift 1 (no shift): SD3 shifts sigmas up (3.0 at 1024 px, 4096 latent tokens) because more pixels
    # keep more signal at a given noise level; 64 tokens of 16x16 pixels need no such shift, and the
    # logit-normal training sigmas are unshifted too, so training and sampling see the same schedule.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def text_conditioning(text_encoders, ids: torch.Tensor, joint_attention_dim: int):
    """SD3's text conditioning for token ids [B, L] without a T5 (max_sequence_length 0), differentiably:
    ``StableDiffusion3Pipeline.encode_prompt`` step for step (CLIP penultimate hidden states side by
    side, zero-padded to joint_attention_dim; pooled = the projections side by side)."""
    outputs = [encoder(ids, output_hidden_states=True) for encoder in text_encoders]
    embeds = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
    embeds = torch.nn.functional.pad(embeds, (0, joint_attention_dim - embeds.shape[-1]))
    pooled = torch.cat([o[0] for o in outputs], dim=-1)
    return embeds, pooled


# ----------------------------------------------------------------------------------------------
# Sampling (Euler ODE + classifier-free guidance), self-contained for evaluation and the sample grid
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(pipe, prompts: list[str], *, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
           num_steps: int = DEFAULT_NUM_STEPS, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Images float32 [B,3,16,16] in [0,1] for ``prompts`` (negative prompt ""), by the same Euler steps
    as ``StableDiffusion3Pipeline.__call__`` on the conditioning of its ``encode_prompt``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = pipe.transformer
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    size, channels = transformer.config.sample_size, transformer.config.in_channels
    use_cfg = guidance_scale > 1.0
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            chunk, None, None, do_classifier_free_guidance=use_cfg, max_sequence_length=0)
        if use_cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        x = torch.randn(n, channels, size, size, generator=gen)
        sched.set_timesteps(num_steps)
        for t in sched.timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            v = transformer(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=embeds,
                            pooled_projections=pooled).sample
            if use_cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = sched.step(v, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate(pipe, guidance_scales, per_combo: int = 5, seed: int = 1234, rewards_dir: str | None = None,
             num_steps: int = DEFAULT_NUM_STEPS) -> dict:
    def sample_fn(prompts, guidance_scale, seed):
        return sample(pipe, prompts, guidance_scale=guidance_scale, num_steps=num_steps, seed=seed)

    return evaluate_sampler(sample_fn, guidance_scales, per_combo, seed=seed, rewards_dir=rewards_dir)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train(steps: int, batch_size: int, seed: int, lr: float = 1e-3, ema_decay: float = 0.995, warmup: int = 100,
          logit_mean: float = 0.0, logit_std: float = 1.0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    tokenizer = build_tokenizer()
    text_encoders = [build_text_encoder(tokenizer), build_text_encoder(tokenizer)]
    transformer = build_transformer()
    scheduler = build_scheduler()
    joint_dim = transformer.config.joint_attention_dim
    num_train_timesteps = scheduler.config.num_train_timesteps

    images, digits, colors = colored_digits(size=16, seed=seed, split="all", colors="all")
    x_all = images * 2.0 - 1.0
    # every caption each image can get (all templates) plus the empty caption, tokenized once
    captions = [""] + [caption(d, c, t) for t in ALL_TEMPLATES for d in range(10) for c in COLOR_NAMES]
    ids = tokenize(tokenizer, captions)
    caption_index = {c: i for i, c in enumerate(captions)}
    cap_table = torch.tensor([[caption_index[caption(int(d), c, t)] for t in ALL_TEMPLATES]
                              for d, c in zip(digits.tolist(), colors)])  # [N, n_templates]

    modules = [transformer, *text_encoders]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    ema_modules = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    ema_params = [p for m in ema_modules for p in m.parameters()]

    for m in modules:
        m.train()
    n = x_all.shape[0]
    losses = []
    t_start = time.time()
    bar = tqdm(range(steps), desc="tiny flow t2i", mininterval=2.0)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0 = x_all[idx]
        tmpl = torch.randint(0, len(ALL_TEMPLATES), (batch_size,), generator=gen)
        cap = cap_table[idx, tmpl]
        cap = torch.where(torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT, torch.zeros_like(cap), cap)
        # logit-normal sigma (SD3's "lognorm(0, 1)"): most weight on the middle of the path
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.reshape(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        embeds, pooled = text_conditioning(text_encoders, ids[cap], joint_dim)
        v = transformer(hidden_states=xt, timestep=sigma * num_train_timesteps, encoder_hidden_states=embeds,
                        pooled_projections=pooled).sample
        loss = ((v - (noise - x0)) ** 2).mean()
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
    ema_transformer, ema_text, ema_text_2 = (m.eval() for m in ema_modules)
    return ema_transformer, (ema_text, ema_text_2), tokenizer, scheduler, info


def save_pipeline(transformer, text_encoders, tokenizer, scheduler, out: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=None,
        text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for component in ("tokenizer", "tokenizer_2"):
        record_tokenizer_class(out, component)


def load_saved(path: str | Path):
    """Reload the saved folder as a plain diffusers pipeline (no VAE, no T5)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), vae=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def write_model_card(out: Path, args, info: dict, metrics: dict, n_params: dict, size_mb: float) -> None:
    hp = {k: info.get(k, getattr(args, k)) for k in ("steps", "batch_size", "seed", "lr", "ema_decay")}
    threads = info.get("threads") or "torch's default threads"
    threads = f"{threads} torch thread{'s' if threads != 1 else ''}" if isinstance(threads, int) else threads
    g = str(args.guidance_scale)
    m = metrics["per_guidance"][g]
    rows = "\n".join(
        f"| {gs} | {_fmt(v['digit_acc'])} | {_fmt(v['color_acc'])} | {_fmt(v['both_acc'])} | "
        f"{_fmt(v['preference_mean'])} |"
        for gs, v in metrics["per_guidance"].items()
    )
    text = f"""# tiny-flow-t2i: the embedded tiny flow-matching text-to-image model of dense_rl

A pixel-space `StableDiffusion3Pipeline` (rectified flow, SD3's MMDiT) without a VAE and without a
T5 that draws 16x16 coloured handwritten digits from text prompts such as "a red digit seven" or
"the number 7 in blue". It is the flow-matching counterpart of `tiny-t2i` (DDIM): the same data,
prompts and reward models, so the flow sampler family runs, and is tested, on a laptop CPU with no
hub download. Load it with `load_pipeline("embedded:tiny-flow")`.

- **Data**: scikit-learn's 8x8 handwritten digits (1797 images), upsampled bilinearly to 16x16 and
  drawn in one of six colours ({", ".join(COLOR_NAMES)}) on black; every image in every colour
  (10,782 images). Captions from {len(ALL_TEMPLATES)} templates (all used in pretraining):
  {"; ".join(repr(t) for t in ALL_TEMPLATES)}. The last one is held out of RL training prompts.
- **Pixel convention**: the diffusion sample x in [-1, 1] is the image: `image = (x.clamp(-1, 1) + 1) / 2`.
- **Tokenizers**: `tokenizer` and `tokenizer_2` are the same word-level tokenizer as tiny-t2i's
  ({len(VOCAB) + len(SPECIAL_TOKENS)} tokens), `[BOS] words [EOS]`, padded with `[PAD]` to 16.
- **Text encoders**: two `CLIPTextModelWithProjection`, 2 layers, width {TEXT_WIDTH}, 2 heads, projection
  {TEXT_PROJECTION} ({n_params['text_encoder']:,} and {n_params['text_encoder_2']:,} parameters). As in SD3 the
  transformer attends to both encoders' penultimate hidden states side by side ([B, 16, 64]) and is
  modulated by both pooled projections ([B, 64]). No T5: `text_encoder_3` is null; prompts get no T5
  tokens (`max_sequence_length=0`; diffusers' `__call__` would otherwise append 256 zero tokens).
- **Transformer**: `SD3Transformer2DModel`, patch 2 (64 image tokens), 4 joint blocks, 4 heads x 16
  (width 64), adaLN-Zero initialisation ({n_params['transformer']:,} parameters).
- **Scheduler**: `FlowMatchEulerDiscreteScheduler`, 1000 train timesteps, shift 1.0. The transformer
  takes timestep = 1000 sigma. No shift: SD3 shifts sigmas up at high resolution (more pixels keep
  more signal at a given noise level); 16x16 pixels need none, and training samples sigma unshifted.
- **Training**: from scratch, rectified flow: x_t = (1 - sigma) x0 + sigma noise with logit-normal
  sigma (mean 0, std 1, as SD3), MSE to the velocity noise - x0; random template per image,
  {int(CAPTION_DROPOUT * 100)}% caption dropout to "" (classifier-free guidance uses "" as the negative prompt),
  AdamW lr {hp['lr']} (100 warmup steps, cosine to 10%), grad-norm clip 1, batch {hp['batch_size']}, {hp['steps']} steps,
  EMA {hp['ema_decay']} (the EMA weights are saved), seed {hp['seed']}. Training took {info['train_seconds']:.0f} s
  wall-clock on a 2-core CPU shared with other jobs ({threads}; about 0.33 s a step, 10 minutes,
  with 2 threads on 2 free cores).
- **Size**: {size_mb:.1f} MB of fp32 safetensors.

Rebuild (the shipped reward models evaluate it; `python -m dense_rl.models.tiny.train.rewards` rebuilds those):

    python -m dense_rl.models.tiny.train.pretrain_flow --steps {hp['steps']} --batch-size {hp['batch_size']} --seed {hp['seed']} --lr {hp['lr']}{f" --threads {info['threads']}" if info.get('threads') else ''}

## Recommended sampling

Euler ODE (the scheduler's own step), {args.num_steps} steps, guidance scale {args.guidance_scale}, negative prompt "".
diffusers' own pipeline does the same with
`pipe(prompts, num_inference_steps={args.num_steps}, guidance_scale={args.guidance_scale}, max_sequence_length=0, output_type="latent")`
(no VAE: the "latents" are the image in [-1, 1]).

## Measured

{metrics['n_samples']} samples (every digit x colour, {metrics['n_samples'] // 60} each, prompts cycling over all
templates), Euler {args.num_steps} steps, scored by the shipped tiny reward models (`dense_rl/assets/rewards/`):

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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the shipped asset)")
    ap.add_argument("--grid", default=str(DEFAULT_GRID), help="sample grid PNG ('' to skip)")
    ap.add_argument("--rewards-dir", default=None, help="reward models for evaluation (default: shipped)")
    ap.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    ap.add_argument("--num-steps", type=int, default=DEFAULT_NUM_STEPS, help="Euler steps when sampling")
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
        transformer, text_encoders, tokenizer, scheduler, info = train(
            args.steps, args.batch_size, args.seed, lr=args.lr, ema_decay=args.ema_decay)
        print(f"trained in {info['train_seconds']:.0f} s; final loss {info['final_loss_avg100']:.4f}")
        info.update({"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
                     "ema_decay": args.ema_decay, "threads": args.threads or None})
        save_pipeline(transformer, text_encoders, tokenizer, scheduler, out)

    # reload exactly as diffusers does, and evaluate the reloaded copy
    pipe = load_saved(out)
    n_params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                for name in ("transformer", "text_encoder", "text_encoder_2")}
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    metrics = {"per_guidance": {}, "n_samples": 0}
    if args.eval_per_combo > 0:
        scales = sorted({float(s) for s in args.eval_guidance.split(",")} | {args.guidance_scale})
        metrics = evaluate(pipe, scales, args.eval_per_combo, rewards_dir=args.rewards_dir, num_steps=args.num_steps)
        print(json.dumps(metrics, indent=1))
        (out / "eval.json").write_text(json.dumps({"train": info, "eval": metrics}, indent=1) + "\n")
    if args.grid:
        prompts = [caption(d, c, TRAIN_TEMPLATES[0]) for d in range(10) for c in COLOR_NAMES]
        imgs = sample(pipe, prompts, guidance_scale=args.guidance_scale, num_steps=args.num_steps, seed=7)
        save_grid(imgs, Path(args.grid), list(DIGIT_WORDS), list(COLOR_NAMES),
                  f'tiny-flow-t2i samples: "a <colour> digit <word>", Euler {args.num_steps} steps, '
                  f'guidance {args.guidance_scale}')
    if metrics["per_guidance"]:
        write_model_card(out, args, info, metrics, n_params, size_mb)
    print(f"done in {time.time() - t_total:.0f} s (training {info['train_seconds']:.0f} s)")
    return {"train": info, "eval": metrics}


if __name__ == "__main__":
    main()
