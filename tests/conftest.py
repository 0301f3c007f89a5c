"""Shared fixtures. Nothing here downloads: tiny models are built and saved by the tests themselves."""

from __future__ import annotations

import os

import pytest
import torch

from support.tiny_models import build_tiny_sd, build_tiny_sd3

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One Ray auth mode for the whole session. A local `ray.init()` with RAY_AUTH_MODE unset switches this
# process to token mode and caches it, while clusters started by the tests (`ray start`, the multi-node
# script) listen on loopback without tokens: mixing the two made later clusters fail to start.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sd3_pixel_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3-pixel"), vae=False)


@pytest.fixture
def one_torch_thread():
    """Sample the tiny model with one torch thread, as each Ray role does: on shared cores it samples
    30-100x slower with 2 threads than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
