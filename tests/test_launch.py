"""`python -m dense_rl.launch` refuses bad input with one line, before Ray or any model is loaded."""

import subprocess
import sys

import pytest

PROBE = (
    "import sys\n"
    "from dense_rl.launch import main\n"
    "code = main(sys.argv[1:])\n"
    "assert 'ray' not in sys.modules, 'ray was imported before the input was checked'\n"
    "assert 'diffusers' not in sys.modules, 'a model library was imported before the input was checked'\n"
    "sys.exit(code)\n"
)


def launch(*args):
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lrr=1"], "error: train.lrr: unknown key"),
        (["--set", "sample.num_steps=ten"], "error: sample.num_steps: expected an integer"),
        (["--set", "credit.window_size=3"], "error: credit.window_size: 3 does not divide sample.num_steps"),
        (["--set", "cluster.num_learner_workers=3"], "error: train.batch_size: 8 is not divisible by cluster.num_learner_workers=3"),
        (["--set", "sample.prompts=/no/prompts.txt"], "error: sample.prompts: file '/no/prompts.txt' does not exist"),
        (["--set", "rewards=[{name: hpsv9}]"], "error: rewards[0].name: unknown reward 'hpsv9'"),
        (["--config", "/no/such.yaml"], "error: --config: file '/no/such.yaml' does not exist"),
        (["--resume", "/tmp"], "error: --resume: /tmp is not a dense_rl run"),
        (["--set", "lora.init_from=/no/lora.safetensors"], "error: lora.init_from: '/no/lora.safetensors' does not exist"),
    ],
)
def test_bad_input_exits_with_one_line(args, message):
    result = launch(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_prompt_file_problems(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = launch("--set", f"sample.prompts={empty}")
    assert result.returncode == 2 and "holds no prompts" in result.stderr
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    result = launch("--set", f"sample.prompts={binary}")
    assert result.returncode == 2 and "is not UTF-8" in result.stderr


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = launch("--set", f"run.output_dir={blocker}", "--set", "run.name=x")
    assert result.returncode == 2 and "run.output_dir: cannot write" in result.stderr


def test_existing_run_must_be_resumed(tmp_path):
    run = tmp_path / "taken"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "latest.json").write_text('{"epoch": 1, "path": "checkpoints/epoch-0001"}')
    result = launch("--set", f"run.output_dir={tmp_path}", "--set", "run.name=taken")
    assert result.returncode == 2 and f"--resume {run}" in result.stderr
