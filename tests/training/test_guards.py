"""Guards on held-out evaluations: their verdicts, the lines that name them, and best.json, which names a
whole copy of the best checkpoint that satisfies every guard (a real run directory, written for real)."""

import dataclasses

import pytest
import torch

from dense_rl.config import ConfigError, GuardConfig, load_config
from dense_rl.run.heldout import BEST_FOLDER, read_best, read_heldout
from dense_rl.run.storage import RunDir
from dense_rl.training.guards import HeldoutWatch, check_guards

BASE = {"digit_alignment": 0.96, "trained": 0.40, "image_brightness": 0.18}


def guard(**rule) -> GuardConfig:
    return GuardConfig(**{"metric": "digit_alignment", "action": "stop", **rule})


def test_each_rule_trips_exactly_past_its_limit():
    guards = [guard(max_drop=0.05), guard(metric="image_brightness", max=0.3, action="warn"),
              guard(metric="trained", min=0.35)]
    within = check_guards(guards, BASE, {"digit_alignment": 0.911, "image_brightness": 0.3, "trained": 0.35})
    assert [check.tripped for check in within] == [False, False, False]  # at the limits: still allowed
    past = check_guards(guards, BASE, {"digit_alignment": 0.909, "image_brightness": 0.301, "trained": 0.349})
    assert [check.tripped for check in past] == [True, True, True]
    assert past[0].limit == pytest.approx(0.91)
    line = past[0].describe(epoch=5, policy_version=6)
    assert line == ("guard guards[0] digit_alignment max_drop 0.05: 0.9090 at epoch 5 (policy version 6), 0.0510 "
                    "below the base model's 0.9600; limit 0.9100") and "\n" not in line


def scores(**means) -> list[dict[str, torch.Tensor]]:
    """One held-out batch of two images whose per-image values average to `means`."""
    return [{name: torch.tensor([value - 0.01, value + 0.01]) for name, value in means.items()}]


def checkpoint(run: RunDir, version: int) -> str:
    folder = f"checkpoints/session/epoch-{version:04d}"
    run.write_bytes(f"{folder}/pytorch_lora_weights.safetensors", f"lora {version}".encode())
    run.write_json(f"{folder}/driver_state.json", {"epoch": version})
    return folder


def test_best_names_a_copy_of_the_highest_checkpoint_that_every_guard_allows(tmp_path):
    config = load_config("configs/tiny.yaml", ["evaluation.every_epochs=2", "evaluation.rewards=[digit_alignment]",
                                               "guards=[{metric: digit_alignment, max_drop: 0.05, action: warn}]",
                                               f"run.output_dir={tmp_path}"])
    run = RunDir(str(tmp_path / "run"))
    watch = HeldoutWatch(config, run)
    assert watch.base is None and [watch.due(v) for v in (1, 2, 3, 4)] == [False, True, False, True]
    watch.record_base(scores(digit_alignment=0.96, trained=0.40))
    for version, (alignment, trained) in {2: (0.95, 0.45), 4: (0.93, 0.50), 6: (0.90, 0.60), 8: (0.94, 0.48)}.items():
        verdict = watch.check(scores(digit_alignment=alignment, trained=trained), epoch=version - 1,
                              policy_version=version, samples=32 * version)
        watch.keep_if_best(verdict, checkpoint(run, version))
        assert [check.tripped for check in verdict.checks] == [version == 6]
    # 6 has the highest reward but trips the guard; 8 allows it but scores less than 4.
    best = read_best(run)
    assert (best["checkpoint"], best["policy_version"], best["epoch"]) == (f"{BEST_FOLDER}/epoch-0004", 4, 3)
    assert best["scores"]["trained"] == pytest.approx(0.50)
    assert run.read_bytes(f"{best['checkpoint']}/pytorch_lora_weights.safetensors") == b"lora 4"
    assert run.list_folders(BEST_FOLDER) == ["epoch-0004"]  # the earlier best's copy is gone
    rows = read_heldout(run)
    assert sorted({row["policy_version"] for row in rows}) == [0, 2, 4, 6, 8]
    base_rows = [row for row in rows if row["policy_version"] == 0]
    assert {row["reward"]: round(row["mean"], 6) for row in base_rows} == {"digit_alignment": 0.96, "trained": 0.4}
    assert all(row["std"] == pytest.approx(0.01, rel=1e-4) for row in base_rows)  # float32 values

    # A later run of the same model, held-out set and rewards takes the base model's scores from the cache.
    later = HeldoutWatch(dataclasses.replace(config, guards=[]), RunDir(str(tmp_path / "later")))
    assert later.base == pytest.approx({"digit_alignment": 0.96, "trained": 0.40})
    other = load_config("configs/tiny.yaml", ["evaluation.every_epochs=2", "evaluation.seed=7", f"run.output_dir={tmp_path}"])
    assert HeldoutWatch(other, RunDir(str(tmp_path / "other"))).base is None  # other noise: not the same base


@pytest.mark.parametrize("overrides, message", [
    (["guards=[{metric: digit_alignmnet, max_drop: 0.05}]"], r"^guards\[0\]\.metric: unknown metric 'digit_alignmnet'"),
    (["guards=[{metric: digit_alignment, max_drop: -0.05}]"], r"^guards\[0\]\.max_drop: must be >= 0"),
    (["guards=[{metric: digit_alignment, max_drop: 0.05, min: 0.9}]"], r"^guards\[0\]: give exactly one of max_drop"),
    (["guards=[{metric: digit_alignment, max_drop: 0.05, action: halt}]"], r"^guards\[0\]\.action: 'halt' is not warn"),
    (["evaluation.every_epochs=0"], r"^evaluation\.every_epochs: guards\[0\] is checked at held-out evaluations"),
    (["evaluation.every_epochs=13"], r"^evaluation\.every_epochs: 13 is longer than the run \(run\.num_epochs=12\)"),
    (["evaluation.rewards=[digit_alignement]"], r"^evaluation\.rewards\[0\]: unknown reward 'digit_alignement'"),
    (["guards=[{metric: image_diversity, min: 0.01}]"], r"^evaluation\.samples_per_prompt: guards\[0\] watches image_diversity"),
])
def test_bad_guard_configuration_is_refused_in_one_line(overrides, message):
    base = ["evaluation.every_epochs=2", "evaluation.rewards=[digit_alignment]",
            "guards=[{metric: digit_alignment, max_drop: 0.05}]"]
    with pytest.raises(ConfigError, match=message) as error:
        load_config("configs/tiny.yaml", base + overrides)
    assert "\n" not in str(error.value)
