"""Every example trains a tiny model for 2 steps, logs per-exit losses and saves a reloadable vanilla checkpoint."""

from __future__ import annotations

import json
import math

import pytest
from example_runs import (
    TINY_TRAIN_ARGS,
    alpaca_rows,
    exit_metrics,
    gsm8k_rows,
    log_history,
    run_example,
    saved_model_exit_losses,
    step_logs,
    triviaqa_rows,
    write_jsonl,
)

EXAMPLE_DATA = {"alpaca": alpaca_rows, "gsm8k": gsm8k_rows, "triviaqa": triviaqa_rows}


@pytest.mark.parametrize("name", sorted(EXAMPLE_DATA))
def test_example_trains_logs_exits_and_saves(name, tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / f"{name}.jsonl", EXAMPLE_DATA[name]())
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir)]
    assert run_example(name, argv + TINY_TRAIN_ARGS, monkeypatch) == 0

    logs = step_logs(output_dir)
    assert sorted(logs) == [1, 2]
    for entry in logs.values():
        metrics = exit_metrics(entry)
        assert set(metrics) == {f"exit_{k}/{m}" for k in (2, 4) for m in ("loss", "mean_token_accuracy")}
        assert all(math.isfinite(value) for value in metrics.values())
    # The effective weights (the default last:0.75 on exits 2 and 4) are reported once, in the first log
    assert [logs[1].get(f"exit_{k}/weight") for k in (2, 4)] == [0.25, 0.75]
    assert not any(key.endswith("/weight") for key in logs[2])
    config = json.loads((output_dir / "config.json").read_text())
    assert config["soft_exit_layers"] == [2, 4]
    # The saved model is a plain transformers checkpoint: it reloads and evaluates at every exit
    losses = saved_model_exit_losses(output_dir, ["Answer: 42", "Question: 7?"])
    assert sorted(losses) == [2, 4] and all(math.isfinite(v) for v in losses.values())


def test_alpaca_example_with_lora_saves_an_adapter(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    output_dir = tmp_path / "lora"
    lora = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir)]
    assert run_example("alpaca", argv + TINY_TRAIN_ARGS + lora, monkeypatch) == 0

    assert (output_dir / "adapter_config.json").exists()
    assert json.loads((output_dir / "adapter_config.json").read_text())["r"] == 4
    assert {"exit_2/loss", "exit_4/loss"} <= set(step_logs(output_dir)[2])


def test_evaluation_on_held_out_rows_logs_eval_exit_losses(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir)]
    argv += ["--eval_strategy", "steps", "--eval_steps", "2", "--eval_holdout_size", "4"]
    assert run_example("alpaca", argv + TINY_TRAIN_ARGS, monkeypatch) == 0

    evaluation = next(entry for entry in log_history(output_dir) if "eval_loss" in entry)
    assert math.isfinite(evaluation["eval_exit_2/loss"]) and math.isfinite(evaluation["eval_exit_4/loss"])
