"""The shipped CPU ZeRO-3 launch config, as an installed user launches it: `accelerate launch --config_file
"$(soft-peft recipes path accelerate/zero3_cpu)" -m soft_peft.cli train ...`, with no device flag of its own, trains
one step on 2 processes; the GPU config launched on this CPU-only machine is refused in one line naming it."""

from __future__ import annotations

import sys

import pytest
import torch
from example_runs import alpaca_rows, free_port, run, save_tiny_model, tiny_args, write_jsonl

pytestmark = pytest.mark.distributed


def shipped_launch_config(name: str) -> str:
    return run([sys.executable, "-m", "soft_peft.cli", "recipes", "path", f"accelerate/{name}"]).stdout.strip()


def launch(config: str, argv: list[str], *launch_flags: str):
    command = ["accelerate", "launch", "--config_file", shipped_launch_config(config), *launch_flags]
    command += ["--main_process_port", str(free_port()), "-m", "soft_peft.cli", "train", *argv]
    return run(command, timeout=900, check=False)


@pytest.fixture(scope="module")
def train_argv(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3_cpu")
    model_dir = save_tiny_model(root / "tiny")
    data = write_jsonl(root / "alpaca.jsonl", alpaca_rows())
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), *tiny_args(per_device_batch=1)]
    argv[argv.index("--max_steps") + 1] = "1"
    return root, argv


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU config on a CPU-only machine")
def test_the_cpu_zero3_config_trains_a_step_on_two_processes(train_argv):
    root, argv = train_argv
    result = launch("zero3_cpu", [*argv, "--output_dir", str(root / "out")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: shard" in result.stdout  # two processes, each holding its shard
    assert (root / "out" / "config.json").exists() and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU config on a CPU-only machine")
def test_the_gpu_zero3_config_on_a_cpu_machine_names_the_cpu_one(train_argv):
    root, argv = train_argv
    result = launch("zero3", [*argv, "--output_dir", str(root / "gpu")], "--num_processes", "2")  # not its 8
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("soft-peft train: error: ")]
    assert len(errors) == 1 and "accelerate/zero3_cpu" in errors[0], result.stderr[-3000:]
