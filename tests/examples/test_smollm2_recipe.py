"""The SmolLM2-135M CPU recipe trains the real model (local folder, the Alpaca seed data in data/): one short step."""

from __future__ import annotations

import json
import math

import pytest
from example_runs import RECIPES, exit_metrics, run_example, step_logs

pytestmark = pytest.mark.slow


def test_smollm2_cpu_recipe_trains_the_real_model(smollm2_path, alpaca_seed_path, tmp_path, monkeypatch):
    argv = ["--config", str(RECIPES / "smollm2_135m_alpaca_cpu.yaml"), "--model_name_or_path", str(smollm2_path)]
    argv += ["--dataset_name", str(alpaca_seed_path), "--output_dir", str(tmp_path), "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "2", "--max_length", "128"]  # a short step: this checks the recipe
    assert run_example("alpaca", argv, monkeypatch) == 0

    metrics = exit_metrics(step_logs(tmp_path)[1])
    assert {f"exit_{k}/loss" for k in (9, 12, 15, 18, 21, 24, 27, 30)} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert json.loads((tmp_path / "config.json").read_text())["soft_exit_layers"] == [9, 12, 15, 18, 21, 24, 27, 30]
