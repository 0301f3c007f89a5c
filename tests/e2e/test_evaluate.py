"""Unseen-reward evaluation after a short real run of the Ray system on the embedded tiny model.

The run trains on `preference`; the evaluation scores base and tuned policies with `digit_alignment`
(unseen) on held-out prompts. The test recomputes the scores independently: a fresh pipeline, the
checkpoint loaded with diffusers' own `load_lora_weights`, the same fixed noise, the reward called
directly.
"""

from __future__ import annotations

import pytest
import torch

from dense_rl.config import load_config
from dense_rl.diffusion.pipeline import load_pipeline
from dense_rl.diffusion.sampler import sample_trajectories
from dense_rl.evaluate import RESULTS_PLOT, RESULTS_TABLE, main
from dense_rl.rewards.tiny import DigitAlignmentReward, PreferenceReward
from dense_rl.run.storage import RunDir
from dense_rl.system.session import run_system
from dense_rl.training.prompts import load_prompts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

RUN_OVERRIDES = [
    "cluster.address=local", "cluster.num_rollout_workers=1", "cluster.num_reward_workers=1",
    "cluster.num_learner_workers=1", "sample.batch_size=16", "sample.num_batches_per_epoch=1",
    "train.batch_size=8", "run.num_epochs=2", "run.name=evaluated",
]
NUM_PROMPTS, SAMPLES_PER_PROMPT, BATCH_SIZE, SEED = 6, 2, 5, 3  # 12 images: batches of 5, 5, 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    config = load_config("configs/tiny.yaml", [*RUN_OVERRIDES, f"run.output_dir={folder}"])
    run_system(config, f"{folder}/evaluated", show_progress=False)
    return f"{folder}/evaluated"


def independent_scores(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each prompt SAMPLES_PER_PROMPT times, in batches of BATCH_SIZE seeded SEED + batch index, scored
    as 8-bit images (what a saved PNG holds, and what training and the evaluation score)."""
    items = [p for p in prompts for _ in range(SAMPLES_PER_PROMPT)]
    images = []
    for b, start in enumerate(range(0, len(items), BATCH_SIZE)):
        images.append(sample_trajectories(
            pipe, items[start : start + BATCH_SIZE], num_steps=20, guidance_scale=4.0, eta=1.0,
            generator=torch.Generator().manual_seed(SEED + b),
        ).images)
    images = (torch.cat(images) * 255).round() / 255
    return {"digit_alignment": DigitAlignmentReward()(images, items), "preference": PreferenceReward()(images, items)}


def test_unseen_reward_evaluation(trained_run, capsys):
    code = main([
        trained_run, "--rewards", "digit_alignment", "--checkpoints", "all", "--max-prompts", str(NUM_PROMPTS),
        "--samples-per-prompt", str(SAMPLES_PER_PROMPT), "--batch-size", str(BATCH_SIZE), "--seed", str(SEED), "--threads", "1",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "digit_alignment" in out and "preference*" in out

    run = RunDir(trained_run)
    rows = run.read_table(RESULTS_TABLE)
    assert run.read_bytes(RESULTS_PLOT)[:8] == b"\x89PNG\r\n\x1a\n"
    heldout = load_prompts("embedded:tiny_heldout")[:NUM_PROMPTS]
    assert not set(heldout) & set(load_prompts("embedded:tiny_train"))  # held out, not trained on
    # Base (version 0) and both checkpoints, every prompt x sample, both rewards as columns.
    assert sorted({row["policy_version"] for row in rows}) == [0, 1, 2]
    for version in (0, 1, 2):
        mine = [row for row in rows if row["policy_version"] == version]
        assert [(row["prompt"], row["sample_index"]) for row in mine] == [(p, k) for p in heldout for k in range(SAMPLES_PER_PROMPT)]
    latest = run.latest_checkpoint()
    assert latest["epoch"] == 2 and {row["checkpoint"] for row in rows if row["policy_version"] == 2} == {latest["path"]}

    base_pipe = load_pipeline("embedded:tiny")
    expected_base = independent_scores(base_pipe, heldout)
    tuned_pipe = load_pipeline("embedded:tiny")
    tuned_pipe.load_lora_weights(f"{trained_run}/{latest['path']}")  # diffusers' loader, not ours
    expected_tuned = independent_scores(tuned_pipe, heldout)
    for version, expected in ((0, expected_base), (2, expected_tuned)):
        mine = [row for row in rows if row["policy_version"] == version]
        for name, values in expected.items():
            got = torch.tensor([row[f"reward_{name}"] for row in mine])
            torch.testing.assert_close(got, values, atol=1e-5, rtol=1e-4)
    # Same noise for every policy, so base and tuned differ only through the LoRA the run learned.
    assert not torch.allclose(expected_base["preference"], expected_tuned["preference"], atol=1e-4)


def test_bad_arguments_fail_with_one_line(trained_run, tmp_path, capsys):
    cases = [
        ([trained_run, "--rewards", "no_such_reward"], "error: --rewards: unknown reward 'no_such_reward'"),
        ([str(tmp_path), "--rewards", "digit_alignment"], "error: RUN_DIR: "),
        ([trained_run, "--rewards", "digit_alignment", "--checkpoints", "7"], "error: --checkpoints: no checkpoint for epoch 7"),
        ([trained_run, "--rewards", "digit_alignment=/no/such.safetensors"], "error: --rewards: digit_alignment: "),
        ([trained_run, "--rewards", "digit_alignment", "--prompts", "/no/such.txt"], "error: --prompts: "),
        ([trained_run, "--rewards", "digit_alignment", "--threads", "0"], "error: --threads: must be >= 1"),
    ]
    before = RunDir(trained_run).read_bytes("metrics.parquet")
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
    assert RunDir(trained_run).read_bytes("metrics.parquet") == before  # nothing the run wrote was touched
