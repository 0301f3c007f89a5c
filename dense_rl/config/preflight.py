"""Input checks that read files but load no weights and start nothing (launch's preflight): a model
that is not on disk, LoRA target modules that match no layer of its denoiser (a UNet, or an SD3
flow transformer), a LoRA file that cannot fit
the adapter, and an epoch too large for this machine's memory.

Only JSON headers and config files are read. Nothing is downloaded: a hub id must already be in the
local Hugging Face cache. torch and diffusers are imported only by `check_target_modules`, which
builds the denoiser from its config on the meta device (no weights).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from dense_rl import ASSETS
from dense_rl.config import Config, ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name dense_rl.diffusion.lora saves (and diffusers loads)
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
GIB = 1024**3


def safetensors_header(path: Path, field: str, *, with_metadata: bool = False):
    """The tensor table of a .safetensors file (names -> dtype, shape), read without loading it; with
    `with_metadata`, (table, the file's string metadata)."""
    try:
        with open(path, "rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(file.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        raise ConfigError(f"{field}: {path} is not a readable .safetensors file; save the LoRA with "
                          "dense_rl or diffusers' save_lora_weights") from None
    metadata = header.pop("__metadata__", None) or {}
    return (header, metadata) if with_metadata else header


def check_lora_file(config: Config) -> None:
    """lora.init_from must be a diffusers-format LoRA safetensors of this config's rank and modules
    (and, when the model's config is on disk, of its cross-attention width). Pickles are refused."""
    field, lora = "lora.init_from", config.lora
    path = Path(lora.init_from)
    if path.is_dir():
        path = path / LORA_FILE
    if path.suffix != ".safetensors":
        raise ConfigError(f"{field}: {path.name} is not a .safetensors file; pickled weights (.bin, .pt) are "
                          "never loaded: convert it to safetensors")
    if not path.is_file():
        raise ConfigError(f"{field}: {path} does not exist; give a LoRA .safetensors file or a folder holding {LORA_FILE}")
    folder = _model_folder(config)
    prefix, denoiser_config = _denoiser_config(folder) if folder is not None else ("unet", {})
    header, metadata = safetensors_header(path, field, with_metadata=True)
    tensors = {k: v for k, v in header.items() if k.startswith(prefix + ".")}
    if not tensors:
        raise ConfigError(f"{field}: {path} holds no {prefix} LoRA weights (keys starting '{prefix}.'); "
                          "is it a LoRA file of this kind of model?")
    _check_lora_alpha(metadata, prefix, lora.alpha, field, path)
    cross_width = denoiser_config.get("cross_attention_dim")
    for name, info in sorted(tensors.items()):
        shape = info.get("shape", [])
        down = ".lora.down." in name or ".lora_A." in name
        module = name.split(".lora")[0]
        if not any(module.endswith("." + target) for target in lora.target_modules):
            raise ConfigError(f"{field}: {path.name} adapts {module.removeprefix(prefix + '.')!r}, which is not in "
                              f"lora.target_modules={lora.target_modules}; set lora.target_modules to match the file")
        if len(shape) != 2:
            raise ConfigError(f"{field}: tensor {name!r} has shape {shape}; LoRA matrices are 2-D")
        rank = shape[0] if down else shape[1]
        if rank != lora.rank:
            raise ConfigError(f"{field}: {path.name} has LoRA rank {rank} ({name!r} is {shape}) but lora.rank="
                              f"{lora.rank}; set lora.rank={rank}")
        if down and cross_width and ".attn2.to_k" in module and shape[1] != cross_width:
            raise ConfigError(f"{field}: {path.name} was made for another model: {name!r} takes {shape[1]} text "
                              f"features, {config.model.pretrained} has {cross_width}; use a LoRA of this model")


def compile_problem(device: str) -> str | None:
    """Why torch.compile cannot run here, as a one-line error naming model.compile; None if it can.
    On CPU its code generator (inductor) builds C++ with the system compiler."""
    import shutil

    import torch

    if not torch._dynamo.is_dynamo_supported():
        return "model.compile: torch.compile does not support this Python; set model.compile=false"
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return ("model.compile: torch.compile on CPU needs a C++ compiler on PATH (g++ or clang++, or $CXX); "
                "install one (apt-get install g++) or set model.compile=false")
    return None


def model_folder(config: Config) -> Path:
    """The folder holding model.pretrained's model_index.json: the embedded model, a local folder, or a
    hub id's snapshot in the local Hugging Face cache (looked up locally only: runs never download)."""
    name, field = config.model.pretrained, "model.pretrained"
    if name.startswith("embedded:"):
        folder = ASSETS / f"{name.removeprefix('embedded:')}-t2i"
        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"{field}: there is no embedded model {name!r}; the shipped one is embedded:tiny")
        return folder
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not org/name
        if not path.is_dir():
            raise ConfigError(f"{field}: {name} does not exist; give a diffusers pipeline folder (holding "
                              "model_index.json) or a hub id such as runwayml/stable-diffusion-v1-5")
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"{field}: {name} has no model_index.json; give a diffusers pipeline folder "
                              "(as save_pretrained writes it)")
        return path
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "model_index.json", revision=config.model.revision)
    except HFValidationError:
        raise ConfigError(f"{field}: {name!r} is neither an existing folder nor a hub id (org/name); give a "
                          "diffusers pipeline folder or a hub id such as runwayml/stable-diffusion-v1-5") from None
    if not isinstance(found, str):
        revision = f" at revision {config.model.revision}" if config.model.revision else ""
        raise ConfigError(f"{field}: {name!r}{revision} is not a local folder nor in the local Hugging Face cache, "
                          f"and runs never download; download it first (hf download {name}) or give a local folder")
    return Path(found).parent


def _check_lora_alpha(metadata: dict, prefix: str, alpha: float, field: str, path: Path) -> None:
    """A file that records its LoraConfig (dense_rl and diffusers write it) must match lora.alpha: the
    adapter's scale is alpha / rank, so another alpha would start from a differently scaled policy."""
    try:
        saved = json.loads(metadata.get("lora_adapter_metadata", "{}")).get(f"{prefix}.lora_alpha")
    except (ValueError, AttributeError):
        return  # metadata written by another tool: nothing to compare
    if saved is not None and float(saved) != alpha:
        raise ConfigError(f"{field}: {path.name} was trained with LoRA alpha {float(saved):g} but lora.alpha={alpha:g}; "
                          f"set lora.alpha={float(saved):g} (the adapter's scale is alpha / rank)")


def _model_folder(config: Config) -> Path | None:
    try:
        return model_folder(config)
    except ConfigError:  # not on disk: estimates that need its config files are skipped
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# The denoiser's folder in a pipeline and the classes whose layers check_target_modules knows.
DENOISERS = {"unet": "UNet2DConditionModel", "transformer": "SD3Transformer2DModel"}


def _denoiser_config(folder: Path) -> tuple[str, dict]:
    """("unet" or "transformer", its config.json) of a pipeline folder; ("unet", {}) if neither is there."""
    for name in DENOISERS:
        found = _read_json(folder / name / "config.json")
        if found:
            return name, found
    return "unet", {}


def trajectory_bytes_per_sample(config: Config) -> int | None:
    """What one sampled trajectory puts in the object store (its latents at every step, log-probs and
    cosines, prompt embeddings, the 8-bit image and, for a credit mode that scores the window
    boundaries, their 8-bit images), from the model's config files; None when they are not on disk."""
    from dense_rl.algo.credit import credit_mode

    folder = _model_folder(config)
    if folder is None:
        return None
    _, denoiser = _denoiser_config(folder)
    text = _read_json(folder / "text_encoder" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    if not denoiser or not text:
        return None
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1) if vae else 1
    size = denoiser.get("sample_size", 64) if config.sample.resolution is None else config.sample.resolution // scale
    height, width = (size, size) if isinstance(size, int) else size
    latent = denoiser.get("in_channels", 4) * height * width
    image = 3 * height * scale * width * scale
    value = 2 if config.model.dtype in ("float16", "bfloat16") else 4
    steps = config.sample.num_steps
    # A flow transformer's text sequence is as wide as its joint attention (CLIP and T5 concatenated).
    width = denoiser.get("joint_attention_dim", text.get("hidden_size", 768))
    embeds = text.get("max_position_embeddings", 77) * width
    # The negative prompt's embedding is one per batch, not per sample.
    embeds *= 1 + (1 / config.sample.batch_size if config.sample.guidance_scale > 1 else 0)
    boundaries = steps // config.credit.window_size if credit_mode(config.credit.mode).boundaries else 0
    return int((steps + 1) * latent * value + 2 * steps * 4 + embeds * value + image * (1 + boundaries))


def _size(count: float) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.1f} MiB"


def check_memory(config: Config, total_memory: int | None = None) -> None:
    """Refuse an epoch whose trajectories cannot fit this machine's memory, with the estimate. An epoch
    lives twice: in Ray's object store and in the learners' copies. Only for runs on this machine."""
    if config.cluster.address not in (None, "local") or (config.cluster.address is None and os.environ.get("RAY_ADDRESS")):
        return  # a remote cluster: its nodes' memory is not known here
    per_sample = trajectory_bytes_per_sample(config)
    if per_sample is None:
        return
    if total_memory is None:
        import psutil

        total_memory = psutil.virtual_memory().total
    sample = config.sample
    needed = 2 * config.samples_per_epoch * per_sample
    if needed > 0.8 * total_memory:
        raise ConfigError(
            f"sample.batch_size: an epoch of {config.samples_per_epoch} samples (sample.batch_size={sample.batch_size} "
            f"x sample.num_batches_per_epoch={sample.num_batches_per_epoch}, {sample.num_steps} steps) needs about "
            f"{_size(needed)} for its trajectories ({_size(per_sample)} each, held by the object store and the "
            f"learners), but this machine has {_size(total_memory)}; lower sample.batch_size, "
            "sample.num_batches_per_epoch or sample.num_steps"
        )


def check_target_modules(config: Config, folder: Path) -> None:
    """Every lora.target_modules entry must name layers of the model's denoiser that LoRA can adapt, by
    peft's rule (a module's name equals the entry or ends with "." + entry); peft itself only fails when
    no entry matches, so a typo in one of them would train without it. The denoiser is built from its
    config on the meta device: no weights are read."""
    prefix, denoiser_config = _denoiser_config(folder)
    class_name = denoiser_config.get("_class_name")
    if class_name != DENOISERS[prefix]:
        return  # config not downloaded yet, or another denoiser: the actors' start check reports it
    import diffusers
    import torch

    lora_layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    with torch.device("meta"):
        denoiser = getattr(diffusers, class_name).from_config(denoiser_config)
    modules = [(name, module) for name, module in denoiser.named_modules() if name]
    examples = _short_names(name for name, module in modules if isinstance(module, lora_layers))
    for target in config.lora.target_modules:
        matched = [module for name, module in modules if name == target or name.endswith("." + target)]
        others = sorted({type(m).__name__ for m in matched if not isinstance(m, lora_layers)})
        if not matched or others:
            what = "matches no module" if not matched else f"names {others[0]} modules, which LoRA cannot adapt,"
            raise ConfigError(f"lora.target_modules: {target!r} {what} in the {'UNet' if prefix == 'unet' else prefix} of {config.model.pretrained}; "
                              f"layers LoRA can adapt are named e.g. {', '.join(examples[:10])}")


def check_family_settings(config: Config, folder: Path) -> None:
    """Settings that belong to one sampler family, on a model of the other (the family is the folder's
    pipeline class: a DDIM UNet or a flow transformer)."""
    prefix, _ = _denoiser_config(folder)
    if config.train.kl_form == "flow_grpo" and prefix == "unet":
        raise ConfigError(f"train.kl_form: flow_grpo is Flow-GRPO's KL for flow-matching models, and "
                          f"{config.model.pretrained} is a DDIM UNet; use exact")


def _short_names(names) -> list[str]:
    """Module names as target_modules entries: the last part (to_q), with its parent when it is an
    index (to_out.0); each once, the most frequent (the attention projections) first."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        tail = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
        counts[tail] = counts.get(tail, 0) + 1
    return sorted(counts, key=lambda tail: -counts[tail])
