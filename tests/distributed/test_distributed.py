"""`examples/alpaca.py` under the shipped accelerate configs with 2 CPU processes (gloo).

Checked for DDP and DeepSpeed ZeRO-3 (FSDP2 cannot run on CPU through accelerate 1.15; see test_fsdp2.py): per-exit
losses are logged; step 1's per-exit losses equal a single-process run on the same global batch (sequential
sampling: 2 processes x 1 row = 1 process x 2 rows); ZeRO-3 partitions the parameters; the saved (gathered)
checkpoint reloads as a vanilla model whose per-exit losses equal the single-process checkpoint's.
"""

from __future__ import annotations

import re

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
    saved_model_exit_losses,
    step_logs,
    tiny_args,
    write_jsonl,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

# fp32 on CPU: the two runs differ only in the order of float reductions (gloo all-reduce vs one batch)
STEP1_RTOL = 1e-5
# After 2 Adam steps from identical states: weights and the reloaded model's losses, same reason
WEIGHTS_ATOL = 1e-5
RELOAD_RTOL = 1e-4
PROBE_TEXTS = ["Add 3 and 4.\n7", "Question: which number follows 9?\nAnswer: 10"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny_model(root / "tiny")
    data = write_jsonl(root / "alpaca.jsonl", alpaca_rows())
    common = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data)]
    common += ["--train_sampling_strategy", "sequential"]
    # The single-process reference: one process, 2 rows per step
    reference = root / "single"
    argv = [*common, *tiny_args(per_device_batch=2), *CPU_SCRIPT_ARGS["single"], "--output_dir", str(reference)]
    run(["python", str(EXAMPLES / "alpaca.py"), *argv])
    return root, common, reference


FSDP_ON_CPU = (
    "accelerate 1.15 enables FSDP only for GPU-type backends: on CPU both processes train unsharded and alone. "
    "test_fsdp2.py checks the SoFT loss under FSDP2 (fully_shard, gloo) directly."
)


@pytest.mark.parametrize("config", ["ddp", "zero3", pytest.param("fsdp2", marks=pytest.mark.skip(reason=FSDP_ON_CPU))])
def test_alpaca_example_distributed(config, setup):
    root, common, reference = setup
    output_dir = root / config
    result = accelerate_launch(
        config, EXAMPLES / "alpaca.py", [*common, *tiny_args(per_device_batch=1), "--output_dir", str(output_dir)]
    )
    assert result.returncode == 0, result.stdout + result.stderr

    logs, reference_logs = step_logs(output_dir), step_logs(reference)
    assert sorted(logs) == [1, 2]
    step1, reference_step1 = exit_metrics(logs[1]), exit_metrics(reference_logs[1])
    assert {"exit_2/loss", "exit_4/loss"} <= set(step1)
    for key, value in reference_step1.items():
        assert step1[key] == pytest.approx(value, rel=STEP1_RTOL), key
    assert logs[1]["num_tokens"] == reference_logs[1]["num_tokens"]  # both ranks' tokens are counted

    pattern = r"rank (\d): shard (\d+) of (\d+) parameter elements \([\d.]+%\), materialized (\d+)"
    shards = {int(rank): tuple(map(int, counts)) for rank, *counts in re.findall(pattern, result.stdout)}
    assert sorted(shards) == [0, 1]
    full = shards[0][1]
    if config == "zero3":  # each rank stores half of every parameter, and no whole parameter outside forward
        assert all(shard <= 0.55 * full and materialized < 0.5 * full for shard, _, materialized in shards.values())
        assert sum(shard for shard, _, _ in shards.values()) >= full
    else:
        assert all(shard == full for shard, _, _ in shards.values())

    # The gathered checkpoint is a vanilla model equal to the single-process one
    weights, reference_weights = (
        load_file(output_dir / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference_weights[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)
    losses, reference_losses = (
        saved_model_exit_losses(output_dir, PROBE_TEXTS),
        saved_model_exit_losses(reference, PROBE_TEXTS),
    )
    assert losses == pytest.approx(reference_losses, rel=RELOAD_RTOL)


def test_quality_controls_under_zero3_match_one_process(tmp_path):
    """exit_head_grad='last' and self-distillation under ZeRO-3 with a tied head (the head gathered again in both
    kernels' backward): step 1's metrics and the trained weights equal a single-process run's."""
    model_dir = save_tiny_model(tmp_path / "tiny", arch="qwen2")
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    common = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data)]
    common += ["--train_sampling_strategy", "sequential", "--exit_loss_weights", "last:0.5"]
    common += ["--exit_head_grad", "last", "--exit_distill_weight", "0.5", "--exit_distill_temperature", "2"]
    reference = tmp_path / "single"
    argv = [*common, *tiny_args(per_device_batch=2), *CPU_SCRIPT_ARGS["single"], "--output_dir", str(reference)]
    run(["python", str(EXAMPLES / "alpaca.py"), *argv])
    output_dir = tmp_path / "zero3"
    result = accelerate_launch(
        "zero3", EXAMPLES / "alpaca.py", [*common, *tiny_args(per_device_batch=1), "--output_dir", str(output_dir)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    step1, reference_step1 = exit_metrics(step_logs(output_dir)[1]), exit_metrics(step_logs(reference)[1])
    assert {"exit_2/agreement", "exit_2/distill_loss"} <= set(reference_step1)
    # abs: the KL of near-identical distributions is a difference of two entropies (~1e-7 float cancellation)
    assert step1 == pytest.approx(reference_step1, rel=STEP1_RTOL, abs=1e-6)
    weights, reference_weights = (
        load_file(output_dir / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference_weights[name], atol=WEIGHTS_ATOL, rtol=0, msg=name)
