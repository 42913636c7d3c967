"""A run SIGKILLed after a checkpoint and restarted with `--resume_from_checkpoint` ends where an uninterrupted run
ends: same weights, same per-exit metrics. Single process, DDP and DeepSpeed ZeRO-3 with 2 CPU processes; and under
ZeRO-3 every saved model equals what DeepSpeed's `zero_to_fp32` rebuilds from the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
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


def launch(config: str, script: Path, argv: list[str], env: dict[str, str] | None = None):
    if config == "single":
        return run(["python", str(script), *argv, *CPU_SCRIPT_ARGS["single"]], check=False, env_overrides=env)
    return accelerate_launch(config, script, argv, env=env)


@dataclass
class ResumeRuns:
    """An uninterrupted run, and a run killed after its checkpoint of step KILL_AFTER then resumed from it."""

    full: Path
    crashed: Path


def full_and_resumed_runs(config: str, root: Path) -> ResumeRuns:
    model_dir = save_tiny_model(root / "tiny")
    data = write_jsonl(root / "alpaca.jsonl", alpaca_rows())
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), *tiny_args(1, steps=STEPS)]
    argv += ["--save_strategy", "steps", "--save_steps", str(KILL_AFTER)]  # the later flag wins
    full, crashed = root / "full", root / "crashed"

    result = launch(config, EXAMPLES / "alpaca.py", [*argv, "--output_dir", str(full)])
    assert result.returncode == 0, result.stdout + result.stderr
    killed = launch(config, KILLER, [*argv, "--output_dir", str(crashed)], {"KILL_AFTER_STEP": str(KILL_AFTER)})
    assert killed.returncode != 0 and "finished without being killed" not in killed.stderr
    checkpoint = crashed / f"checkpoint-{KILL_AFTER}"
    assert checkpoint.is_dir() and not (crashed / "model.safetensors").exists()

    resumed = launch(
        config,
        EXAMPLES / "alpaca.py",
        [*argv, "--output_dir", str(crashed), "--resume_from_checkpoint", str(checkpoint)],
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return ResumeRuns(full, crashed)


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """`resume_runs(config)`: the runs of `config`, made once per module (the ZeRO-3 ones serve two tests)."""
    made = {}

    def get(config: str) -> ResumeRuns:
        if config not in made:
            made[config] = full_and_resumed_runs(config, tmp_path_factory.mktemp(f"resume-{config}"))
        return made[config]

    return get


@pytest.mark.parametrize("config", ["single", "ddp", "zero3"])
def test_resume_after_sigkill_matches_uninterrupted_run(config, resume_runs):
    runs = resume_runs(config)
    weights, expected = load_file(runs.crashed / "model.safetensors"), load_file(runs.full / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=ATOL, rtol=0, msg=name)
    logs, expected_logs = step_logs(runs.crashed), step_logs(runs.full)
    assert sorted(logs) == list(range(1, STEPS + 1))  # steps before the crash come back with the checkpoint's state
    for step in logs:
        assert exit_metrics(logs[step]) == pytest.approx(exit_metrics(expected_logs[step]), abs=ATOL), step
        assert logs[step]["num_tokens"] == expected_logs[step]["num_tokens"], step  # counted on, not from 0
    assert {"exit_2/loss", "exit_4/loss"} <= set(logs[STEPS])


def test_zero3_checkpoints_equal_deepspeeds_zero_to_fp32(resume_runs):
    """The model soft-peft saves (gathered by `zero3_save_16bit_model`) in each checkpoint and at the end equals the
    fp32 weights DeepSpeed's `zero_to_fp32` rebuilds from that checkpoint's ZeRO-3 partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    runs = resume_runs("zero3")
    pairs = [(runs.full / f"checkpoint-{step}", step) for step in range(KILL_AFTER, STEPS + 1, KILL_AFTER)]
    pairs.append((runs.crashed / f"checkpoint-{STEPS}", STEPS))  # saved by the resumed run
    for checkpoint, step in pairs:
        assert (checkpoint / f"global_step{step}").is_dir()
        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=f"global_step{step}")
        saved = load_file(checkpoint / "model.safetensors")
        assert saved.keys() == consolidated.keys()
        for name, tensor in saved.items():
            torch.testing.assert_close(tensor, consolidated[name], atol=0, rtol=0, msg=f"{checkpoint.name} {name}")
    final = load_file(runs.full / "model.safetensors")  # the final model is the last checkpoint's
    last = load_file(runs.full / f"checkpoint-{STEPS}" / "model.safetensors")
    assert all(torch.equal(final[name], last[name]) for name in final)
