"""Checkpoints: one module owns them; what the learner and the driver write comes back whole; resume
takes this session's train.* values; each session's config is kept."""

import argparse
import json

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.diffusion.lora import LORA_FILE as LORA_MODULE_FILE
from dense_rl.diffusion.lora import add_lora, lora_state_dict
from dense_rl.diffusion.pipeline import load_pipeline
from dense_rl.run.checkpoints import (
    LORA_FILE,
    complete_checkpoint,
    driver_state_dict,
    load_resume_point,
    new_driver_state,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_learner,
    write_learner_files,
)
from dense_rl.run.records import RunRecorder
from dense_rl.run.storage import RunDir
from dense_rl.training.update import make_optimizer
from support.imports import import_graph

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PATH = "checkpoints/from-epoch-0000-test/epoch-0001"


def _learner(tiny_sd_dir, config):
    """What a learner worker builds: the pipeline, a LoRA (alpha = 2 x rank) and its AdamW."""
    pipe = load_pipeline(tiny_sd_dir)
    params = add_lora(pipe.unet, 4, 8.0, TARGETS)
    return pipe.unet, params, make_optimizer(params, config.train)


def _step(params, optimizer):
    optimizer.zero_grad()
    sum(((p - 0.1) ** 2).sum() for p in params).backward()
    optimizer.step()


def test_driver_state_lora_and_optimizer_round_trip(tiny_sd_dir, tmp_path):
    config = load_config(None, ["train.lr=1e-3"])
    unet, params, optimizer = _learner(tiny_sd_dir, config)
    for _ in range(2):
        _step(params, optimizer)
    state = new_driver_state(config)
    state.epoch, state.samples_seen, state.history = 1, 16, [{"epoch": 0, "reward_mean": 0.5}]
    state.reward_tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 2.0, 3.0, 5.0]).numpy())
    state.step_tracker.update(["a", "b"], torch.tensor([0.5, -0.5]).numpy())

    run = RunDir(str(tmp_path / "run"))
    write_learner_files(run.child(PATH), unet, optimizer)
    assert load_resume_point(run, config)[2] is None  # the learner's half alone is not a checkpoint yet
    complete_checkpoint(run, PATH, state)

    loaded, lora, path = load_resume_point(run, config)
    assert path == PATH and run.latest_checkpoint() == {"epoch": 1, "path": PATH}
    assert driver_state_dict(loaded) == json.loads(json.dumps(driver_state_dict(state)))
    original = lora_state_dict(unet)
    assert lora.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(lora[key], original[key], rtol=0, atol=0)
    # The file in the run directory is what diffusers reads, adapter config included.
    _, metadata = run.read_tensors_and_metadata(f"{PATH}/{LORA_FILE}")
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0

    twin_unet, twin_params, twin = _learner(tiny_sd_dir, config)
    restore_learner(run.child(PATH), twin_unet, twin, config.train)
    for mine, theirs in zip(params, twin_params):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(twin.state[theirs][key], optimizer.state[mine][key], rtol=0, atol=0)


def test_resume_trains_with_the_new_optimizer_settings(tiny_sd_dir, tmp_path):
    """--resume RUN --set train.lr=... : the restored optimizer holds the new values, and its next step
    is the step of an uninterrupted optimizer switched to them at that point."""
    first = load_config(None, ["train.lr=1e-3"])
    unet, params, optimizer = _learner(tiny_sd_dir, first)
    _step(params, optimizer)
    run = RunDir(str(tmp_path / "run"))
    write_learner_files(run.child(PATH), unet, optimizer)

    changed = {"lr": 3e-4, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_weight_decay": 0.05, "adam_epsilon": 1e-6}
    resumed = load_config(None, [f"train.{k}={v}" for k, v in changed.items()])
    twin_unet, twin_params, twin = _learner(tiny_sd_dir, resumed)
    restore_learner(run.child(PATH), twin_unet, twin, resumed.train)
    for group in twin.param_groups:
        assert group["lr"] == 3e-4 and tuple(group["betas"]) == (0.8, 0.99)
        assert group["weight_decay"] == 0.05 and group["eps"] == 1e-6

    for group in optimizer.param_groups:  # the uninterrupted run, switched by hand
        group.update(lr=3e-4, betas=(0.8, 0.99), weight_decay=0.05, eps=1e-6)
    before = [p.detach().clone() for p in params]
    _step(params, optimizer)
    _step(twin_params, twin)
    for mine, theirs, old in zip(params, twin_params, before):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-9)
    assert any(not torch.equal(p, old) for p, old in zip(params, before))


def test_each_session_adds_a_config_to_the_history(tmp_path):
    from dense_rl.launch import parse_args, resolve_config

    run = RunDir(str(tmp_path / "run"))
    RunRecorder(run, load_config(None, ["train.lr=1e-3"])).write_config(start_epoch=0)
    for epoch, lr in ((2, "5e-4"), (5, "2e-4")):  # two resumes, each with --set train.lr
        config, uri = resolve_config(parse_args(["--resume", run.uri, "--set", f"train.lr={lr}"]))
        assert uri == run.uri and config.train.lr == float(lr)
        RunRecorder(run, config).write_config(start_epoch=epoch)

    names = run.list_files("config_history")
    assert names == ["000-from-epoch-0000.yaml", "001-from-epoch-0002.yaml", "002-from-epoch-0005.yaml"]
    lrs = [load_config(str(tmp_path / "run" / "config_history" / name)).train.lr for name in names]
    assert lrs == [1e-3, 5e-4, 2e-4]
    assert run.read_bytes("config.yaml") == run.read_bytes(f"config_history/{names[-1]}")  # the newest
    args = argparse.Namespace(resume=run.uri, config=None, overrides=[])
    assert resolve_config(args)[0].train.lr == 2e-4  # a later resume starts from the newest


def test_a_run_from_before_the_history_keeps_its_first_config(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_bytes("config.yaml", b"train:\n  lr: 0.001\n")  # what older versions wrote, once
    RunRecorder(run, load_config(None, ["train.lr=5e-4"])).write_config(start_epoch=3)
    assert run.list_files("config_history") == ["000-from-epoch-0000.yaml", "001-from-epoch-0003.yaml"]
    assert run.read_bytes("config_history/000-from-epoch-0000.yaml") == b"train:\n  lr: 0.001\n"


def test_optimizer_state_round_trip():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        sum((p**2).sum() for p in params).backward()
        optimizer.step()
    tensors, metadata = optimizer_to_tensors(optimizer)
    twin = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=5.0)
    twin.load_state_dict(optimizer_from_tensors(tensors, metadata))
    assert twin.param_groups[0]["lr"] == 1e-3
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(twin.state[twin.param_groups[0]["params"][0]][key], optimizer.state[params[0]][key])


def test_lora_file_name_is_the_one_lora_writes():
    assert LORA_FILE == LORA_MODULE_FILE


# ---------------------------------------------------------------------- imports


def test_checkpoint_imports_no_driver_roles_run_record_or_ray():
    top, nested, packages = import_graph()
    imported = top["dense_rl.run.checkpoints"] | nested["dense_rl.run.checkpoints"]
    assert not {m for m in imported if m.startswith(("dense_rl.system", "dense_rl.run.records"))}
    assert "ray" not in packages["dense_rl.run.checkpoints"] and "safetensors" in packages["dense_rl.run.storage"]


@pytest.mark.parametrize("user", ["dense_rl.system.driver", "dense_rl.system.roles.learner", "dense_rl.run.records",
                                  "dense_rl.system.session", "dense_rl.launch"])
def test_driver_learner_and_resume_go_through_the_checkpoint_module(user):
    top, nested, _ = import_graph()
    assert "dense_rl.run.checkpoints" in top[user] | nested[user]
