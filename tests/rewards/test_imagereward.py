"""ImageReward on transformers' BLIP classes, checked against a forward pass written out here.

The test builds a tiny BLIP (ViT + BERT with cross-attention, random weights), converts it to the
layout of ImageReward's `ImageReward.pt` (timm ViT names, BLIP's med.py names, `mlp.layers.N`),
saves it with a med_config.json and a BERT vocabulary, and loads it through the scorer's own
loading code. The reference below reimplements the original's computation with plain tensor ops on
the *original* layout (timm's fused-qkv ViT, post-LN BERT, the MLP, (r - mean) / std), its PIL
preprocessing, and BERT's tokenisation, so a wrong key mapping, eps, head split or normalisation
shows up as a score difference.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dense_rl.rewards import build_reward
from dense_rl.rewards.imagereward import (
    PIXEL_MEAN,
    PIXEL_STD,
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardScorer,
    _head,
    preprocess,
)

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "sitting", "on", "the", "grass", ","]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VIT = dict(width=64, depth=2, patch=8, image=32, heads=1, mlp=128)
BERT = dict(width=32, depth=2, heads=2, mlp=64, positions=40)


# ------------------------------------------------------------------------ building the checkpoint


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        p.data = 1.0 + 0.1 * noise if ("norm" in name.lower() and name.endswith("weight")) else 0.2 * noise


def _to_original_layout(vision, text, head) -> dict[str, torch.Tensor]:
    """transformers' names -> ImageReward.pt's (the inverse of what the scorer must do)."""
    state = {}
    for key, value in vision.state_dict().items():
        name = (key.replace("embeddings.class_embedding", "cls_token")
                .replace("embeddings.position_embedding", "pos_embed")
                .replace("embeddings.patch_embedding.", "patch_embed.proj.")
                .replace("post_layernorm.", "norm."))
        name = re.sub(r"encoder\.layers\.(\d+)\.", r"blocks.\1.", name)
        name = (name.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
                .replace("self_attn.qkv", "attn.qkv").replace("self_attn.projection", "attn.proj"))
        state[f"blip.visual_encoder.{name}"] = value.clone()
    for key, value in text.state_dict().items():
        state[f"blip.text_encoder.{key}"] = value.clone()
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(BERT["positions"]).unsqueeze(0)
    # BLIP's contrastive projections ride along in the real checkpoint; scoring does not use them.
    state["blip.vision_proj.weight"] = torch.zeros(16, VIT["width"])
    state["blip.text_proj.weight"] = torch.zeros(16, BERT["width"])
    for key, value in head.state_dict().items():
        state[f"mlp.layers.{key}"] = value.clone()
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    folder = tmp_path_factory.mktemp("imagereward")
    generator = torch.Generator().manual_seed(0)
    vocab = SPECIALS + WORDS
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=VIT["width"], intermediate_size=VIT["mlp"], num_hidden_layers=VIT["depth"],
        num_attention_heads=VIT["heads"], image_size=VIT["image"], patch_size=VIT["patch"],
    ))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=len(vocab) + 2, hidden_size=BERT["width"], encoder_hidden_size=VIT["width"],
        intermediate_size=BERT["mlp"], num_hidden_layers=BERT["depth"], num_attention_heads=BERT["heads"],
        max_position_embeddings=BERT["positions"],
    ), add_pooling_layer=False)
    head = _head(BERT["width"])
    for module in (vision, text, head):
        _randomise(module, generator)
    state = _to_original_layout(vision, text, head)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "vocab_size": len(vocab) + 2, "hidden_size": BERT["width"],
        "num_hidden_layers": BERT["depth"], "num_attention_heads": BERT["heads"], "intermediate_size": BERT["mlp"],
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": BERT["positions"],
        "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768, "add_cross_attention": True,
    }))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder, state, vocab


# ------------------------------------------------------------------------ the reference computation


def _layer_norm(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def _linear(x, state, prefix):
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def _attend(q, k, v, heads, additive_mask=None):
    b, n, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def reference_vit(state, pixels):
    s = {k[len("blip.visual_encoder."):]: v.double() for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    x = F.conv2d(pixels.double(), s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=VIT["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x], dim=1) + s["pos_embed"]
    for i in range(VIT["depth"]):
        h = _layer_norm(x, s, f"blocks.{i}.norm1", 1e-6)
        q, k, v = _linear(h, s, f"blocks.{i}.attn.qkv").chunk(3, dim=-1)  # timm: qkv fused in this order
        x = x + _linear(_attend(q, k, v, VIT["heads"]), s, f"blocks.{i}.attn.proj")
        h = _layer_norm(x, s, f"blocks.{i}.norm2", 1e-6)
        x = x + _linear(F.gelu(_linear(h, s, f"blocks.{i}.mlp.fc1")), s, f"blocks.{i}.mlp.fc2")
    return _layer_norm(x, s, "norm", 1e-6)


def reference_score(state, pixels, input_ids, attention_mask):
    image = reference_vit(state, pixels)
    s = {k[len("blip.text_encoder."):]: v.double() for k, v in state.items() if k.startswith("blip.text_encoder.")}
    length = input_ids.shape[1]
    x = s["embeddings.word_embeddings.weight"][input_ids] + s["embeddings.position_embeddings.weight"][:length]
    x = _layer_norm(x, s, "embeddings.LayerNorm", 1e-12)
    pad_mask = (1.0 - attention_mask.double())[:, None, None, :] * -10000.0  # BERT's extended mask
    for i in range(BERT["depth"]):
        for kind, keys, mask in (("attention", x, pad_mask), ("crossattention", image, None)):
            p = f"encoder.layer.{i}.{kind}"
            q = _linear(x, s, f"{p}.self.query")
            k, v = _linear(keys, s, f"{p}.self.key"), _linear(keys, s, f"{p}.self.value")
            out = _linear(_attend(q, k, v, BERT["heads"], mask), s, f"{p}.output.dense")
            x = _layer_norm(out + x, s, f"{p}.output.LayerNorm", 1e-12)
        h = F.gelu(_linear(x, s, f"encoder.layer.{i}.intermediate.dense"))
        x = _layer_norm(_linear(h, s, f"encoder.layer.{i}.output.dense") + x, s, f"encoder.layer.{i}.output.LayerNorm", 1e-12)
    r = x[:, 0]
    m = {k[len("mlp.layers."):]: v.double() for k, v in state.items() if k.startswith("mlp.layers.")}
    for index in (0, 2, 4, 6, 7):  # the Linear layers; dropouts between are off at inference
        r = _linear(r, m, str(index))
    return ((r.squeeze(-1) - REWARD_MEAN) / REWARD_STD).float()


def reference_tokens(prompts, vocab, max_length=35):
    """bert-base-uncased style: lowercase, split words and punctuation, [CLS] ... [SEP], pad with 0."""
    ids = []
    for prompt in prompts:
        words = re.findall(r"\w+|[^\w\s]", prompt.lower())
        row = [vocab.index("[CLS]")] + [vocab.index(w) if w in vocab else vocab.index("[UNK]") for w in words]
        row = row[: max_length - 1] + [vocab.index("[SEP]")]
        ids.append(row + [0] * (max_length - len(row)))
    ids = torch.tensor(ids)
    return ids, (ids != 0).long()


def reference_preprocess_pil(images, size):
    """ImageReward's transform on PIL images: Resize(size, bicubic), CenterCrop, ToTensor, Normalize."""
    out = []
    for image in images:
        pil = Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        w, h = pil.size
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        pil = pil.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1))
    return torch.stack(out)


PROMPTS = [
    "a photo of a cat",
    "A red dog, sitting on the grass",
    "a blue zebra",  # "zebra" is not in the vocabulary: [UNK]
    " ".join(["the red cat"] * 14),  # 42 words: truncated to 35 tokens
]


# ------------------------------------------------------------------------ tests


def test_tokenisation_matches_bert(checkpoint):
    folder, _, vocab = checkpoint
    scorer = ImageRewardScorer(path=str(folder))
    ids, mask = scorer.tokenize(PROMPTS)
    expected_ids, expected_mask = reference_tokens(PROMPTS, vocab)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(mask, expected_mask)


def test_scores_match_reference_forward(checkpoint):
    folder, state, vocab = checkpoint
    scorer = build_reward("imagereward", path=str(folder))  # the RewardWorker's path to it
    assert isinstance(scorer, ImageRewardScorer)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(PROMPTS), 3, VIT["image"], VIT["image"], generator=generator)
    ids, mask = reference_tokens(PROMPTS, vocab)
    got = scorer.score_pixels(pixels, ids, mask)
    expected = reference_score(state, pixels, ids, mask)
    assert got.shape == (len(PROMPTS),) and got.dtype == torch.float32
    assert expected.std() > 0.05  # the random model separates the inputs, so the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_end_to_end_matches_pil_pipeline(checkpoint):
    """Images in [0,1] of another size and aspect, through tensor preprocessing, batched in chunks,
    against the original's PIL preprocessing + reference forward. The resampling kernels differ
    slightly (torch's antialiased bicubic vs PIL's on 8-bit data), so this is a measured tolerance."""
    folder, state, vocab = checkpoint
    scorer = ImageRewardScorer(path=str(folder / "ImageReward.pt"), batch_size=3)  # a file, beside its config
    generator = torch.Generator().manual_seed(2)
    # Smooth images (upsampled noise) like a diffusion model's, 48 x 64 (H x W): resize + centre crop.
    images = F.interpolate(torch.rand(len(PROMPTS), 3, 6, 8, generator=generator), size=(48, 64), mode="bilinear")
    got = scorer(images, PROMPTS)
    ids, mask = reference_tokens(PROMPTS, vocab)
    # Chunked scoring of raw images == the reference forward on the scorer's own preprocessing.
    torch.testing.assert_close(got, reference_score(state, preprocess(images, VIT["image"]), ids, mask),
                               atol=1e-4, rtol=1e-5)
    # The tensor preprocessing is the PIL one to within one 8-bit grey level per pixel (measured:
    # max 0.0153 after normalisation, i.e. 1/255 / 0.2613) ...
    pixels = reference_preprocess_pil(images, VIT["image"])
    one_level = 1.0 / 255 / min(PIXEL_STD)
    assert (preprocess(images, VIT["image"]) - pixels).abs().max() <= 1.05 * one_level
    # ... which moves this (deliberately sensitive, random) model's scores by at most 2% (measured 1.3%).
    torch.testing.assert_close(got, reference_score(state, pixels, ids, mask), atol=0, rtol=0.02)
    # Scores follow the images, not their batch position.
    flipped = scorer(images.flip(0), PROMPTS[::-1])
    torch.testing.assert_close(flipped, got.flip(0), atol=1e-5, rtol=0)


def test_bad_inputs_fail_clearly(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    with pytest.raises(FileNotFoundError, match=r"rewards\[\]\.path: .* holds neither ImageReward.pt"):
        ImageRewardScorer(path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"rewards\[\]\.path: .*neither a file, a folder nor a hub id"):
        ImageRewardScorer(path="./no/such/ImageReward.pt")
    scorer = ImageRewardScorer(path=str(folder))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(torch.rand(2, 3, 32, 32), ["a cat"])


class _RunsOnUnpickle:
    """Unpickling this would call `_record_call`: what a malicious checkpoint would do."""

    calls: list = []

    def __reduce__(self):
        return (_record_call, ("unpickled",))


def _record_call(value):
    _RunsOnUnpickle.calls.append(value)
    return value


def test_checkpoint_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would call a function is rejected, and the function never runs."""
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1), "extra": _RunsOnUnpickle()}, tmp_path / "ImageReward.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        ImageRewardScorer(path=str(tmp_path))
    assert _RunsOnUnpickle.calls == []


def test_hub_id_loads_through_the_hub_cache(checkpoint, tmp_path):
    """With no `path` the scorer resolves THUDM/ImageReward (and bert-base-uncased's vocabulary)
    through huggingface_hub. Offline, a hub cache holding the tiny model under those ids stands in
    for the download; scores must equal the same files loaded from a local folder."""
    import os
    import shutil
    import subprocess
    import sys

    folder, _, _ = checkpoint
    cache = tmp_path / "hub"
    for repo, files in [("THUDM/ImageReward", ["ImageReward.pt", "med_config.json"]),
                        ("google-bert/bert-base-uncased", ["vocab.txt"])]:
        snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)  # huggingface_hub's layout
        snapshot.mkdir(parents=True)
        for name in files:
            shutil.copy(folder / name, snapshot / name)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import json, torch; from dense_rl.rewards import build_reward;"
        f"images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True);"
        "print(json.dumps(build_reward('imagereward')(images, ['a cat', 'a red dog']).tolist()))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from_hub = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    local = ImageRewardScorer(path=str(folder))(images, ["a cat", "a red dog"])
    torch.testing.assert_close(from_hub, local, atol=1e-5, rtol=1e-5)
