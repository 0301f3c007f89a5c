"""PickScore and LAION aesthetic on tiny CLIP models saved by the test, loaded through the same
from_pretrained / local-or-hub code a GPU user runs, checked against independent computations."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPTokenizer

from dense_rl.config import ConfigError, load_config
from dense_rl.rewards import build_reward
from support.tiny_models import save_tiny_clip

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red cat", "a blue dog on a hill", "sunset"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    return folder, save_tiny_clip(folder)


def test_pickscore_equals_scaled_cosine_of_clip_forward(tiny_clip):
    folder, model = tiny_clip
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reward = build_reward("pickscore", path=str(folder))
    scores = reward(images, PROMPTS)

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():  # CLIPModel.forward: logits_per_image = exp(logit_scale) * cos(image_i, text_j)
        out = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=(images - MEAN) / STD)
    expected = out.logits_per_image.diagonal()
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # Matching the prompt matters: pairing each image with another prompt changes its score.
    assert not torch.allclose(reward(images, PROMPTS[1:] + PROMPTS[:1]), scores)


def test_pickscore_resizes_like_the_clip_image_processor(tiny_clip):
    """Larger, non-square images go through our tensor resize + centre crop; the saved processor
    (PIL bicubic on uint8) lands on nearly the same pixels."""
    folder, _ = tiny_clip
    pixels = torch.randint(0, 256, (2, 3, 40, 56), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    reward = build_reward("pickscore", path=str(folder))
    ours = reward.pixel_values(pixels.float() / 255.0)
    processor = CLIPImageProcessor.from_pretrained(folder)
    theirs = processor(images=[p.permute(1, 2, 0).numpy() for p in pixels], return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.02  # kernels differ slightly (0.005); wrong geometry gives ~0.7


def test_aesthetic_equals_head_on_normalised_image_embedding(tmp_path):
    model = save_tiny_clip(tmp_path)
    torch.manual_seed(3)
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in ** 0.5
        head[f"layers.{index}.bias"] = torch.randn(fan_out)
    torch.save(head, tmp_path / "aesthetic-model.pth")  # the released head is a .pth state dict
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    scores = build_reward("aesthetic", path=str(tmp_path))(images, ["ignored"] * 4)

    with torch.no_grad():
        embedding = model.visual_projection(model.vision_model(pixel_values=(images - MEAN) / STD).pooler_output)
        x = embedding / embedding.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # linear layers only: dropout is identity at eval, no activations
            x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-4, rtol=1e-5)
    assert scores.std() > 0


def test_half_precision_path_runs_and_stays_close_to_float32(tiny_clip):
    """The GPU path's dtype handling (fp16 weights, fp16 pixels, float32 scores out), on the CPU."""
    folder, _ = tiny_clip
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    full = build_reward("pickscore", path=str(folder), dtype="float32")
    half = build_reward("pickscore", path=str(folder), dtype="float16")
    assert half.model.dtype == torch.float16 and full.model.dtype == torch.float32
    assert half(images, PROMPTS).dtype == torch.float32
    torch.testing.assert_close(half(images, PROMPTS), full(images, PROMPTS), atol=0.05, rtol=0)


def test_reward_dtype_is_validated_in_config():
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.dtype: float16 needs a GPU"):
        load_config(overrides=["rewards=[{name: pickscore, dtype: float16}]"])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.dtype: 'half' is not auto"):
        load_config(overrides=["rewards=[{name: hps, dtype: half}]"])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.dtype: preference always runs in float32"):
        load_config(overrides=["rewards=[{name: preference, dtype: float32}]"])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.path: '/no/such/hps' does not exist"):
        load_config(overrides=["rewards=[{name: hps, path: /no/such/hps}]"])
    config = load_config(overrides=["rewards=[{name: hps, dtype: float16}]", "cluster.reward_gpus=1"])
    assert config.rewards[0].dtype == "float16"


def test_default_hub_ids_load_through_the_hub_cache(tiny_clip, tmp_path):
    """With no `path`, the rewards resolve their real hub ids through huggingface_hub. Offline, a hub
    cache holding tiny models under those ids stands in for the download; scores must equal the
    same weights loaded from a local folder."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    folder, _ = tiny_clip
    head_dir = tmp_path / "head"
    head_dir.mkdir()
    torch.manual_seed(6)
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in ** 0.5
        head[f"layers.{index}.bias"] = torch.randn(fan_out)
    torch.save(head, head_dir / "aesthetic-model.pth")

    cache = tmp_path / "hub"
    for repo, source in [("yuvalkirstain/PickScore_v1", folder), ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", folder),
                         ("openai/clip-vit-large-patch14", folder), ("trl-lib/ddpo-aesthetic-predictor", head_dir)]:
        repo_dir = cache / f"models--{repo.replace('/', '--')}"  # huggingface_hub's cache layout
        shutil.copytree(source, repo_dir / "snapshots" / ("0" * 40))
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text("0" * 40)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import json, sys, torch; from dense_rl.rewards import build_reward;"
        f"images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True);"
        "print(json.dumps({name: build_reward(name)(images, ['a cat', 'a dog']).tolist() for name in ('pickscore', 'aesthetic')}))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from_hub = json.loads(done.stdout.strip().splitlines()[-1])

    (folder / "aesthetic-model.pth").write_bytes((head_dir / "aesthetic-model.pth").read_bytes())
    try:
        local = {name: build_reward(name, path=str(folder))(images, ["a cat", "a dog"]) for name in ("pickscore", "aesthetic")}
    finally:
        (folder / "aesthetic-model.pth").unlink()
    for name in local:
        torch.testing.assert_close(torch.tensor(from_hub[name]), local[name], atol=1e-5, rtol=1e-5)
