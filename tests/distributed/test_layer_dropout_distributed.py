"""Layer dropout under DDP and ZeRO-3 with 2 CPU processes (gloo), against 1 process on the same global batch.

Each rank draws the masks of the whole global batch and keeps its rows, so 2 processes x 1 row drop the same layers
for the same rows as 1 process x 2 rows. With rate 0.5 on every layer of the tiny 4-layer model, each rank's single
row skips about half the layers: layers that no sample of a rank's batch runs are common, and gradient
synchronisation must still see every parameter (every layer runs; dropped rows take the layer's input back).
"""

from __future__ import annotations

import pytest
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

pytestmark = pytest.mark.distributed

STEP_RTOL = 1e-5  # fp32: the runs differ only in the order of float reductions
DROPOUT = ["--layer_dropout", "0.5", "--layer_dropout_scale", "constant"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layer_dropout")
    model_dir = save_tiny_model(root / "tiny")
    data = write_jsonl(root / "alpaca.jsonl", alpaca_rows())
    common = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data)]
    common += ["--train_sampling_strategy", "sequential", *DROPOUT]
    reference = root / "single"
    argv = [*common, *tiny_args(per_device_batch=2), *CPU_SCRIPT_ARGS["single"], "--output_dir", str(reference)]
    run(["python", str(EXAMPLES / "alpaca.py"), *argv])
    plain = root / "plain"  # the same run without layer dropout: the dropout must change the losses
    no_dropout = common[: -len(DROPOUT)]
    argv = [*no_dropout, *tiny_args(per_device_batch=2), *CPU_SCRIPT_ARGS["single"], "--output_dir", str(plain)]
    run(["python", str(EXAMPLES / "alpaca.py"), *argv])
    return root, common, reference, plain


@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_layer_dropout_two_processes_equal_one(config, setup):
    root, common, reference, plain = setup
    output_dir = root / config
    result = accelerate_launch(
        config,
        EXAMPLES / "alpaca.py",
        [*common, *tiny_args(per_device_batch=1), "--output_dir", str(output_dir)],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    logs, reference_logs, plain_logs = step_logs(output_dir), step_logs(reference), step_logs(plain)
    assert sorted(logs) == [1, 2]
    for step in (1, 2):
        metrics, expected = exit_metrics(logs[step]), exit_metrics(reference_logs[step])
        assert set(metrics) == set(expected)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=STEP_RTOL), (step, key)
    # Dropout reached the losses: the run without it logs other ones at step 1 already
    assert exit_metrics(plain_logs[1])["exit_2/loss"] != pytest.approx(exit_metrics(reference_logs[1])["exit_2/loss"])
