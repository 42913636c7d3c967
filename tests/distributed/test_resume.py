"""A run SIGKILLed after a checkpoint and restarted with `--resume_from_checkpoint` ends where an uninterrupted run
ends: same weights, same per-exit metrics. Single process, and DDP with 2 CPU processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from example_runs import (
    CPU_SCRIPT_ARGS,
    EXAMPLES,
    accelerate_launch,
    alpaca_rows,
    exit_metrics,
    run,
    save_tiny_model,
    step_logs,
    tiny_args,
    write_jsonl,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

KILLER = Path(__file__).resolve().parent / "kill_after_checkpoint.py"
STEPS, KILL_AFTER = 4, 2
# The resumed run replays the same batches from restored optimizer/scheduler/RNG states; only float noise may differ
ATOL = 1e-6


def launch(config: str, script: Path, argv: list[str]):
    if config == "single":
        return run(["python", str(script), *argv, *CPU_SCRIPT_ARGS["single"]], check=False)
    return accelerate_launch(config, script, argv)


@pytest.mark.parametrize("config", ["single", "ddp"])
def test_resume_after_sigkill_matches_uninterrupted_run(config, tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), *tiny_args(1, steps=STEPS)]
    argv += ["--save_strategy", "steps", "--save_steps", str(KILL_AFTER)]  # the later flag wins
    full, crashed = tmp_path / "full", tmp_path / "crashed"

    assert launch(config, EXAMPLES / "alpaca.py", [*argv, "--output_dir", str(full)]).returncode == 0
    os.environ["KILL_AFTER_STEP"] = str(KILL_AFTER)
    try:
        killed = launch(config, KILLER, [*argv, "--output_dir", str(crashed)])
    finally:
        del os.environ["KILL_AFTER_STEP"]
    assert killed.returncode != 0 and "finished without being killed" not in killed.stderr
    checkpoint = crashed / f"checkpoint-{KILL_AFTER}"
    assert checkpoint.is_dir() and not (crashed / "model.safetensors").exists()

    resumed = launch(
        config,
        EXAMPLES / "alpaca.py",
        [*argv, "--output_dir", str(crashed), "--resume_from_checkpoint", str(checkpoint)],
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    weights, expected = load_file(crashed / "model.safetensors"), load_file(full / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=ATOL, rtol=0, msg=name)
    logs, expected_logs = step_logs(crashed), step_logs(full)
    assert sorted(logs) == list(range(1, STEPS + 1))  # steps before the crash come back with the checkpoint's state
    for step in logs:
        assert exit_metrics(logs[step]) == pytest.approx(exit_metrics(expected_logs[step]), abs=ATOL), step
