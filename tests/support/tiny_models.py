"""Tiny models the tests build and save themselves (nothing is downloaded): Stable-Diffusion-1.5- and
SD3-shaped pipelines and a CLIP model, a few hundred kB each, in the layouts their hubs use."""

from __future__ import annotations

import json

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer


def write_clip_bpe(folder) -> tuple[str, str]:
    """A character-level CLIP BPE vocabulary: enough for CLIPTokenizer to tokenise English text."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789,.!"
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + list(letters) + [c + "</w>" for c in letters]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")
    return str(vocab_file), str(merges_file)


def build_tiny_sd(folder, *, set_alpha_to_one: bool = False, sample_size: int = 8, vae: bool = True,
                  **unet_options) -> str:
    """Save a Stable-Diffusion-1.5-shaped pipeline (VAE, UNet, CLIP text encoder and tokenizer, PNDM
    scheduler), a few hundred kB, and return its folder. `vae=False` leaves the VAE out (the pipeline
    then diffuses in pixel space, as the embedded model does); `unet_options` override the UNet's."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = write_clip_bpe(folder)
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=24)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ) if vae else None
    unet = UNet2DConditionModel(**{
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
        "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 4,
        "norm_num_groups": 8, **unet_options,
    })
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=set_alpha_to_one, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return str(folder / "pipeline")


def build_tiny_sd3(folder, *, vae: bool = True, shift: float = 3.0) -> str:
    """Save a Stable-Diffusion-3-shaped pipeline (SD3Transformer2DModel, two CLIP text encoders with
    projection and their tokenizers, FlowMatchEulerDiscreteScheduler, an AutoencoderKL with SD3's
    shift_factor; no T5), random weights, a few hundred kB, and return its folder. `vae=False` leaves
    the VAE out: the transformer then diffuses 3-channel pixels, as the embedded flow model does."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = write_clip_bpe(folder)

    def encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=24, projection_dim=32,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))

    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=24)
    tokenizer_2 = CLIPTokenizer(vocab_file, merges_file, model_max_length=24)
    text_encoder, text_encoder_2 = encoder(), encoder()
    autoencoder = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,  # SD3's VAE
    ) if vae else None
    channels = 4 if vae else 3
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=channels, out_channels=channels, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=8,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return str(folder / "pipeline")


def save_tiny_clip(folder, image_size: int = 32, projection_dim: int = 16) -> CLIPModel:
    """A CLIPModel with tiny widths, its tokenizer and image processor, saved like a hub repo."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = write_clip_bpe(folder)
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=24)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=projection_dim),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim, logit_scale_init_value=2.3,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(folder)
    return model


