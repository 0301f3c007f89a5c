"""HPS v2.1: our scorer (transformers.CLIPModel + key mapping) against hpsv2's own scoring code.

A tiny OpenCLIP-format checkpoint is built by hpsv2's vendored OpenCLIP in a separate process (see
tests/rewards/reference/hpsv2_reference.py), then the same images and prompts are scored by
`hpsv2.img_score.score` there and by `build_reward("hps", path=folder)` here.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dense_rl.rewards import build_reward

REFERENCE = Path(os.environ.get("HPSV2_REFERENCE", Path(sys.prefix) / "hpsv2-reference"))
REFERENCE_SCRIPT = Path(__file__).parent / "reference" / "hpsv2_reference.py"
BPE_VOCAB = REFERENCE / "hpsv2" / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"

TINY_OPEN_CLIP = {  # ViT-H-14's family (ViT + text transformer, GELU), tiny widths
    "embed_dim": 16,
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "head_width": 8, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
PROMPTS = [
    "a photo of a cat",
    "A Watercolor painting of a LIGHTHOUSE at dusk, trending on artstation!",
    "an astronaut riding a horse, " + "highly detailed, " * 30,  # longer than 77 tokens: truncated
]

pytestmark = pytest.mark.skipif(
    not BPE_VOCAB.is_file(), reason=f"hpsv2 reference environment missing at {REFERENCE}; run `make install`"
)


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-character table, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def save_clip_tokenizer_from_bpe(folder: Path) -> None:
    """vocab.json + merges.txt (the transformers CLIPTokenizer format) from OpenCLIP's BPE file."""
    from transformers import CLIPTokenizer

    merges = gzip.open(BPE_VOCAB).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    base = _bytes_to_unicode()
    vocab = base + [c + "</w>" for c in base] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


def run_reference(argument: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REFERENCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(REFERENCE_SCRIPT), argument], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_scores(folder: Path, jobs: list[dict]) -> list[list[float]]:
    job_file = folder / "job.json"
    job_file.write_text(json.dumps({"folder": str(folder), "model_cfg": TINY_OPEN_CLIP, "seed": 0, "jobs": jobs}))
    return run_reference(str(job_file))["scores"]


def test_hps_matches_hpsv2_reference(tmp_path):
    rng = np.random.default_rng(0)
    # Square images larger than the model (resize only) and wide ones (resize + pad), as uint8 files
    # so both sides see exactly the same pixels.
    batches = {"square": rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8),
               "wide": rng.integers(0, 256, size=(3, 42, 70, 3), dtype=np.uint8)}
    jobs, order = [], []
    for kind, pixels in batches.items():
        for i, prompt in enumerate(PROMPTS):
            path = tmp_path / f"{kind}{i}.png"
            Image.fromarray(pixels[i]).save(path)
            jobs.append({"images": [str(path)], "prompt": prompt})
            order.append((kind, i))
    reference = [scores[0] for scores in reference_scores(tmp_path, jobs)]
    save_clip_tokenizer_from_bpe(tmp_path)

    reward = build_reward("hps", path=str(tmp_path))
    ours = {kind: reward(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0, PROMPTS)
            for kind, pixels in batches.items()}
    ours = [float(ours[kind][i]) for kind, i in order]

    assert np.allclose(ours, reference, atol=1e-5, rtol=0), (ours, reference)
    # The scores differ between images: not a constant.
    assert len(set(np.round(reference, 4))) == len(reference)


def test_the_real_vit_h_14_checkpoint_maps_onto_every_clipmodel_weight():
    """Shapes only (meta tensors, no download): every OpenCLIP ViT-H-14 weight lands on a CLIPModel
    weight of the same shape, and none is left over on either side."""
    from transformers import CLIPModel

    from dense_rl.rewards.hps import VIT_H_14, clip_config_from_open_clip, open_clip_to_transformers

    shapes = run_reference("--vit-h-14-shapes")
    mapped = open_clip_to_transformers({k: torch.empty(s, device="meta") for k, s in shapes.items()}, VIT_H_14)
    with torch.device("meta"):
        model = CLIPModel(clip_config_from_open_clip(VIT_H_14))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    used = {k for k in shapes if not k.startswith("attn_mask")}
    assert sum(int(np.prod(shapes[k])) for k in used) == sum(int(np.prod(s)) for s in expected.values())
    assert 0.98e9 < sum(int(np.prod(s)) for s in expected.values()) < 1.0e9  # ViT-H-14: 986M parameters


def test_hps_tokenisation_pads_with_zero_and_keeps_end_token(tmp_path):
    from transformers import AutoTokenizer

    from dense_rl.rewards.hps import hps_token_ids

    save_clip_tokenizer_from_bpe(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = hps_token_ids(tokenizer, PROMPTS, context_length=77)
    short = ids[0].tolist()
    # "a photo of a cat" in CLIP BPE: <start> a photo of a cat <end>, then zeros
    assert short[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(short[7:]) == {0}
    assert ids[2, -1].item() == 49407 and (ids[2] != 0).all()


def test_hps_refuses_a_checkpoint_with_missing_weights(tmp_path):
    from dense_rl.rewards.hps import HPS_FILES

    save_clip_tokenizer_from_bpe(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    torch.save({"state_dict": {"logit_scale": torch.tensor(1.0)}}, tmp_path / HPS_FILES["v2.1"])
    with pytest.raises(KeyError, match="visual.class_embedding"):  # the first weight looked up after logit_scale
        build_reward("hps", path=str(tmp_path))
