"""The SmolLM2-135M CPU recipe trains the real model (local folder, the Alpaca seed data in data/): one short step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from example_runs import RECIPES, exit_metrics, run_example, step_logs
from safetensors import safe_open

pytestmark = pytest.mark.slow


def test_smollm2_cpu_recipe_trains_the_real_model(smollm2_path, alpaca_seed_path, tmp_path, monkeypatch):
    argv = ["--config", str(RECIPES / "smollm2_135m_alpaca_cpu.yaml"), "--model_name_or_path", str(smollm2_path)]
    argv += ["--dataset_name", str(alpaca_seed_path), "--output_dir", str(tmp_path), "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "2", "--max_length", "128"]  # a short step: this checks the recipe
    # The recipe warms up over 5% of the steps: one step would run at learning rate 0, leaving the weights as they were
    argv += ["--warmup_steps", "0"]
    assert run_example("alpaca", argv, monkeypatch) == 0

    metrics = exit_metrics(step_logs(tmp_path)[1])
    assert {f"exit_{k}/loss" for k in (9, 12, 15, 18, 21, 24, 27, 30)} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert json.loads((tmp_path / "config.json").read_text())["soft_exit_layers"] == [9, 12, 15, 18, 21, 24, 27, 30]
    # The step trained: a shallow layer (reached by every exit's loss) moved
    name = "model.layers.0.self_attn.q_proj.weight"
    with (
        safe_open(str(smollm2_path / "model.safetensors"), "pt") as before,
        safe_open(str(tmp_path / "model.safetensors"), "pt") as after,
    ):
        assert not torch.equal(before.get_tensor(name).float(), after.get_tensor(name).float())
