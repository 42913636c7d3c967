"""`examples/alpaca.py` under the shipped DeepSpeed ZeRO-3 config with one process, against one unsharded process.

On CUDA with the config as shipped (bf16, NCCL): step 1's per-exit losses equal the unsharded run's (both forward the
same bf16 weights), ZeRO-3 partitions the parameters, and the gathered checkpoint reloads as a vanilla model with
`soft_exit_layers`. CUDA only: the CPU form of this body (fp32, gloo, `SETTINGS["cpu"]`) passed once but took 9
minutes on the 2-core CI machine; tests/distributed/test_distributed.py covers ZeRO-3 with 2 CPU processes in CI.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from cuda_devices import CUDA
from example_runs import (
    EXAMPLES,
    RECIPES,
    alpaca_rows,
    exit_metrics,
    free_port,
    run,
    save_tiny_model,
    saved_model_exit_losses,
    step_logs,
    tiny_args,
    write_jsonl,
)
from safetensors.torch import load_file

EXITS = [2, 4]
PROBE_TEXTS = ["Add 3 and 4.\n7", "Question: which number follows 9?\nAnswer: 10"]
# Per device: the flags of the ZeRO-3 launch, the script flags of both runs, and the step-1 / reload tolerances.
# In bf16 the runs differ by kernel choice and reduction order (~1e-3); after 2 steps DeepSpeed's fp32 master
# weights and the plain run's bf16 weights round differently
FP32, BF16 = ["--dtype", "float32", "--bf16", "false"], ["--dtype", "bfloat16", "--bf16", "true"]
SETTINGS = {
    "cpu": (["--mixed_precision", "no"], FP32, ["--ddp_backend", "gloo"], 1e-5, 1e-4),
    "cuda": ([], BF16, [], 1e-2, 5e-2),
}
SHARD_LINE = r"rank 0: shard (\d+) of (\d+) parameter elements \([\d.]+%\), materialized (\d+)"


@pytest.mark.distributed
@pytest.mark.parametrize("device", [CUDA])
def test_zero3_one_process_matches_unsharded_and_reloads(device, tmp_path):
    launch_flags, precision, zero3_script_flags, step1_rtol, reload_rtol = SETTINGS[device]
    model_dir = save_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), *tiny_args(per_device_batch=2)]
    argv += ["--train_sampling_strategy", "sequential", *precision]  # the later flag wins over tiny_args'
    unsharded, zero3 = tmp_path / "unsharded", tmp_path / "zero3"

    single_flags = ["--use_cpu", "true"] if device == "cpu" else []
    # This interpreter, not `python` / `accelerate` from PATH: GPU images may have neither name
    run([sys.executable, str(EXAMPLES / "alpaca.py"), *argv, *single_flags, "--output_dir", str(unsharded)])
    config = RECIPES / "accelerate" / "zero3.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1"]
    launch += launch_flags
    launch += ["--main_process_port", str(free_port()), str(EXAMPLES / "alpaca.py")]
    result = run([*launch, *argv, *zero3_script_flags, "--output_dir", str(zero3)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    shard = re.search(SHARD_LINE, result.stdout)
    assert shard is not None, result.stdout
    _, full, materialized = map(int, shard.groups())
    assert materialized < full  # ZeRO-3 holds no whole parameter outside forward, even with one process

    step1, reference = exit_metrics(step_logs(zero3)[1]), exit_metrics(step_logs(unsharded)[1])
    assert {f"exit_{k}/loss" for k in EXITS} <= set(step1)
    for key, value in reference.items():
        assert step1[key] == pytest.approx(value, rel=step1_rtol), key

    assert json.loads((zero3 / "config.json").read_text())["soft_exit_layers"] == EXITS
    weights, reference_weights = load_file(zero3 / "model.safetensors"), load_file(unsharded / "model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference_weights.items()}
    losses = saved_model_exit_losses(zero3, PROBE_TEXTS)
    assert sorted(losses) == EXITS
    assert losses == pytest.approx(saved_model_exit_losses(unsharded, PROBE_TEXTS), rel=reload_rtol)
