"""hpsv2's own scoring code, run in its own process for tests/rewards/test_rewards_clip_hps.py.

Usage: python hpsv2_reference.py JOB.json  (JOB: {"folder", "model_cfg", "seed", "jobs": [{"images", "prompt"}]})
       python hpsv2_reference.py --vit-h-14-shapes  (the real model's state-dict shapes, built on the meta device)

1. builds a tiny OpenCLIP-format HPS checkpoint with hpsv2's vendored OpenCLIP (random weights,
   every parameter perturbed so no LayerNorm or bias is left at its trivial init), saved as
   FOLDER/HPS_v2.1_compressed.pt = {"state_dict": ...} like the released files, plus
   FOLDER/open_clip_config.json;
2. scores each job with `hpsv2.img_score.score(image_paths, prompt, cp=checkpoint)`, the package's
   public scoring function (its global model slot is filled with the tiny model so it does not
   download ViT-H-14), and prints {"scores": [[...], ...]} as JSON.

Runs with PYTHONPATH=<reference dir> (see the Makefile's install recipe): hpsv2 1.2.0 and what it
imports, kept out of the main environment because hpsv2's pins break ray[default] and torchvision
would be picked up by transformers. torchvision's compiled ops are built for CUDA torch and cannot
load on the CPU build; hpsv2 uses only its pure-Python transforms, so the import-time fake-kernel
registrations for those ops are skipped.
"""

import json
import sys
import types
from pathlib import Path

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import torch  # noqa: E402
from hpsv2 import img_score  # noqa: E402
from hpsv2.src.open_clip.factory import add_model_config, create_model_and_transforms  # noqa: E402


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    folder = Path(job["folder"])
    config_file = folder / "tiny-hps.json"
    config_file.write_text(json.dumps(job["model_cfg"]))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": job["model_cfg"]}))
    add_model_config(config_file)

    torch.manual_seed(job["seed"])
    model, _, preprocess_val = create_model_and_transforms(
        "tiny-hps", None, precision="amp", device="cpu", light_augmentation=True, output_dict=True,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    checkpoint = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)

    img_score.model_dict["model"] = model
    img_score.model_dict["preprocess_val"] = preprocess_val
    scores = [
        [float(s) for s in img_score.score(item["images"], item["prompt"], cp=str(checkpoint), hps_version="v2.1")]
        for item in job["jobs"]
    ]
    print(json.dumps({"scores": scores}))


def vit_h_14_shapes() -> None:
    from hpsv2.src.open_clip.factory import get_model_config
    from hpsv2.src.open_clip.model import CLIP

    with torch.device("meta"):
        model = CLIP(**get_model_config("ViT-H-14"))
    print(json.dumps({key: list(value.shape) for key, value in model.state_dict().items()}))


if __name__ == "__main__":
    vit_h_14_shapes() if sys.argv[1] == "--vit-h-14-shapes" else main(sys.argv[1])
