"""Kill test: a run sent a real SIGTERM (or SIGINT) at a random step saves `checkpoint-N` at that step boundary,
exits non-zero with one line naming the `--resume_from_checkpoint` flag, and resumed from it ends with the same
weights, bit for bit, as an uninterrupted run. One process, and DDP with 2 CPU processes (signal to the launcher, or
to one rank only: the ranks must agree on the step)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from example_runs import (
    CPU_LAUNCH,
    CPU_SCRIPT_ARGS,
    EXAMPLES,
    RECIPES,
    ROOT,
    alpaca_rows,
    free_port,
    run,
    save_tiny_model,
    step_logs,
    tiny_args,
    write_jsonl,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

PAUSER = Path(__file__).resolve().parent / "pause_for_signal.py"
STEPS = 6
RESUME_LINE = re.compile(r"stopped by (SIG\w+) after step (\d+) of \d+; .* --resume_from_checkpoint (\S+)")


def command(config: str, script: Path, argv: list[str]) -> list[str]:
    if config == "single":
        return [sys.executable, str(script), *argv, *CPU_SCRIPT_ARGS["single"]]
    launch = ["accelerate", "launch", "--config_file", str(RECIPES / "accelerate" / f"{config}.yaml"), *CPU_LAUNCH]
    return [*launch, "--main_process_port", str(free_port()), str(script), *argv, *CPU_SCRIPT_ARGS[config]]


def run_signalled(config: str, argv: list[str], step: int, rank: int, target: str, signum: int, folder: Path):
    """Run the pausing script; at `step`, send `signum` to `target` ("process": the script or the launcher, or
    "rank": the paused rank only); return the finished process's result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(PAUSE_AT_STEP=str(step), PAUSE_RANK=str(rank), PAUSE_DIR=str(folder))
    process = subprocess.Popen(
        command(config, PAUSER, argv), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    marker, deadline = folder / f"paused-{rank}", time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate(timeout=60)
    time.sleep(0.2)  # the PID is written
    os.kill(process.pid if target == "process" else int(marker.read_text()), signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal")
    model_dir = save_tiny_model(root / "tiny")
    data = write_jsonl(root / "alpaca.jsonl", alpaca_rows())
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), *tiny_args(1, steps=STEPS)]
    return root, argv, {}


def uninterrupted(setup, config: str) -> Path:
    root, argv, done = setup
    if config not in done:
        done[config] = root / f"full-{config}"
        result = run(command(config, EXAMPLES / "alpaca.py", [*argv, "--output_dir", str(done[config])]), check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    return done[config]


@pytest.mark.parametrize(
    "config, target, rank, signum",
    [
        ("single", "process", 0, signal.SIGTERM),
        ("single", "process", 0, signal.SIGINT),
        ("ddp", "process", 0, signal.SIGTERM),  # to `accelerate launch`, which passes it to both ranks
        ("ddp", "rank", 1, signal.SIGTERM),  # to rank 1 alone: rank 0 must stop at the same step
    ],
    ids=["single-SIGTERM", "single-SIGINT", "ddp-launcher", "ddp-one-rank"],
)
def test_signal_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(setup, config, target, rank, signum):
    root, argv, _ = setup
    step = random.randint(1, STEPS - 1)
    case = root / f"{config}-{target}-{signum.name}"
    output_dir = case / "out"
    case.mkdir()
    full = uninterrupted(setup, config)

    stopped = run_signalled(config, [*argv, "--output_dir", str(output_dir)], step, rank, target, signum, case)
    assert stopped.returncode != 0, f"step {step}: exit 0 after a signal\n{stopped.stderr}"
    if config == "single":
        assert stopped.returncode == 128 + signum
    lines = [m for m in map(RESUME_LINE.search, stopped.stderr.splitlines()) if m]
    assert len(lines) == 1, f"step {step}: one resume line expected\n{stopped.stderr}"
    name, stopped_at, checkpoint = lines[0].groups()
    assert (name, int(stopped_at)) == (signum.name, step), stopped.stderr
    assert Path(checkpoint) == output_dir / f"checkpoint-{step}"
    # Nothing lost: the whole checkpoint is on disk; no final model claims a finished run; the lock is gone
    for file in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "soft_peft_run.json"):
        assert (Path(checkpoint) / file).is_file(), file
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / ".soft-peft.lock").exists()

    resumed = run(
        command(config, EXAMPLES / "alpaca.py", [*argv, "--output_dir", str(output_dir), "--resume_from_checkpoint"]),
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    weights, expected = load_file(output_dir / "model.safetensors"), load_file(full / "model.safetensors")
    assert weights.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(weights[key], tensor), f"{key} differs after a stop at step {step}"
    assert sorted(step_logs(output_dir)) == list(range(1, STEPS + 1))
