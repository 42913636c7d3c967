"""Multi-node launches: the shipped multi-node accelerate configs and recipes/slurm/soft_peft.sbatch.

SLURM is replaced by two small fakes put first on PATH: `scontrol show hostnames` prints the job's hosts and `srun`
runs its command once per node, in parallel, with that node's SLURM_NODEID (as `srun --ntasks-per-node=1` does).
- Dry run: every node's command, parsed by accelerate's own `launch` parser and run through its launcher up to
  torchrun (patched there), gets the node's rank, the first host as rendezvous, and every process of the job.
- Real run, CPU: the script starts two `accelerate launch` processes, two "machines" of one process each on this
  host (ZeRO-3, gloo), whose step-1 per-exit losses equal one process on the same global batch.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest
import torch.distributed.run as torchrun
from accelerate.commands.launch import launch_command, launch_command_parser
from example_runs import (
    CPU_SCRIPT_ARGS,
    EXAMPLES,
    RECIPES,
    alpaca_rows,
    exit_metrics,
    free_port,
    run,
    save_tiny_model,
    step_logs,
    tiny_args,
    write_jsonl,
)

SBATCH = RECIPES / "slurm" / "soft_peft.sbatch"
MULTINODE_CONFIGS = ["zero3_multinode", "fsdp2_multinode"]
HOSTS = ["gpu07", "gpu08", "gpu09", "gpu10"]
STEP1_RTOL = 1e-5  # fp32 on CPU: the runs differ only in the order of float reductions

FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# Prints every host, as the real one does: the script must take the first without failing on the rest
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" && "$3" == "$SLURM_JOB_NODELIST" ]] || exit 1
printf '%s\\n' $FAKE_SLURM_HOSTS
"""


def fake_slurm(folder: Path, hosts: list[str], **env: str) -> dict[str, str]:
    """The environment of a SLURM batch step on `hosts`, with the fake `srun` / `scontrol` first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IXUSR)
    return {
        "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": f"gpu[{len(hosts)}-nodes]",
        "SLURM_NNODES": str(len(hosts)),
        "SLURM_JOB_ID": "4242",
        "FAKE_SLURM_HOSTS": " ".join(hosts),
        "FAKE_SLURM_LOG": str(folder / "srun.log"),
        **env,
    }


def node_commands(stdout: str) -> dict[int, list[str]]:
    """The dry run's `node K: <shell-quoted command>` lines, by node."""
    commands = {}
    for line in stdout.splitlines():
        node, command = line.split(": ", 1)
        commands[int(node.removeprefix("node "))] = shlex.split(command)
    return commands


def torchrun_launch(launch_args: list[str], monkeypatch) -> tuple:
    """Run `accelerate launch <launch_args>` through accelerate's launcher, stopped where it starts torchrun: the
    torchrun launch config, the worker command and arguments, and the environment the workers would get."""
    seen = {}

    def fake_run(args):
        seen["config"], seen["command"], seen["args"] = torchrun.config_from_args(args)
        seen["env"] = dict(os.environ)

    monkeypatch.setattr(torchrun, "run", fake_run)
    launch_command(launch_command_parser().parse_args(launch_args))
    return seen["config"], seen["command"], seen["args"], seen["env"]


@pytest.mark.parametrize("config", MULTINODE_CONFIGS)
def test_sbatch_gives_each_node_its_rank_and_the_first_node_as_rendezvous(config, tmp_path, monkeypatch):
    port = free_port()
    env = fake_slurm(
        tmp_path / "bin",
        HOSTS,
        DRY_RUN="1",
        GPUS_PER_NODE="8",
        MAIN_PROCESS_PORT=str(port),
        ACCELERATE_CONFIG=f"recipes/accelerate/{config}.yaml",
        SLURM_CPUS_PER_TASK="96",
    )
    script = ["examples/alpaca.py", "--config", "recipes/llama2_13b_alpaca_zero3.yaml", "--run_name", "a b's $HOME"]
    result = run(["bash", str(SBATCH), *script], env_overrides=env)
    commands = node_commands(result.stdout)
    assert sorted(commands) == [0, 1, 2, 3]
    srun = (tmp_path / "bin" / "srun.log").read_text()
    assert srun.startswith("srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ")

    for node, command in commands.items():
        assert command[:2] == ["accelerate", "launch"]
        assert command[-len(script) :] == script  # the user's arguments, quoting intact
        launch, worker, worker_args, worker_env = torchrun_launch(command[2:], monkeypatch)
        assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (4, 4, 8)
        assert launch.rdzv_configs["rank"] == node
        assert launch.rdzv_endpoint == f"{HOSTS[0]}:{port}"
        assert worker_args == ["-u", *script]
        if config.startswith("zero3"):
            assert worker_env["ACCELERATE_USE_DEEPSPEED"] == "true"
            assert worker_env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
        else:
            assert worker_env["ACCELERATE_USE_FSDP"] == "true" and worker_env["FSDP_VERSION"] == "2"
        assert worker_env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_sbatch_refuses_to_run_outside_slurm_or_without_a_script(tmp_path):
    env = fake_slurm(tmp_path / "bin", HOSTS[:2])
    outside = {**env, "SLURM_JOB_NODELIST": "", "SLURM_NNODES": ""}  # empty counts as unset for the script
    result = run(["bash", str(SBATCH), "examples/alpaca.py"], check=False, env_overrides=outside)
    assert result.returncode != 0 and "not in a SLURM job: submit this script with sbatch" in result.stderr
    result = run(["bash", str(SBATCH)], check=False, env_overrides=env)
    assert result.returncode == 2 and "usage: sbatch recipes/slurm/soft_peft.sbatch" in result.stderr
    assert not (tmp_path / "bin" / "srun.log").exists()


@pytest.mark.distributed
def test_two_machines_on_one_host_match_one_process(tmp_path):
    """The sbatch script on 2 fake nodes of 1 CPU process each, with the shipped ZeRO-3 multi-node config."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    common = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data)]
    common += ["--train_sampling_strategy", "sequential"]
    reference = tmp_path / "single"
    argv = [*common, *tiny_args(per_device_batch=2), *CPU_SCRIPT_ARGS["single"], "--output_dir", str(reference)]
    run(["python", str(EXAMPLES / "alpaca.py"), *argv])

    output_dir = tmp_path / "two_machines"
    env = fake_slurm(
        tmp_path / "bin",
        ["127.0.0.1", "127.0.0.1"],
        GPUS_PER_NODE="1",
        MAIN_PROCESS_PORT=str(free_port()),
        LAUNCH_ARGS="--mixed_precision no",
    )
    argv = [*common, *tiny_args(per_device_batch=1), *CPU_SCRIPT_ARGS["zero3"], "--output_dir", str(output_dir)]
    result = run(["bash", str(SBATCH), str(EXAMPLES / "alpaca.py"), *argv], check=False, env_overrides=env)
    assert result.returncode == 0, result.stdout + result.stderr
    # Two launchers, each one machine of a 2-machine, 2-process job (their torchrun agents print the node ranks)
    assert "2 nodes x 1 processes, main process on 127.0.0.1" in result.stderr
    for rank in (0, 1):
        assert f"rank {rank}: shard" in result.stdout

    logs, reference_logs = step_logs(output_dir), step_logs(reference)
    step1, reference_step1 = exit_metrics(logs[1]), exit_metrics(reference_logs[1])
    assert {"exit_2/loss", "exit_4/loss"} <= set(step1)
    assert step1 == pytest.approx(reference_step1, rel=STEP1_RTOL)
    assert logs[1]["num_tokens"] == reference_logs[1]["num_tokens"]  # both machines' tokens are counted
