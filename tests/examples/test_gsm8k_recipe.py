"""recipes/smollm2_135m_gsm8k_soft.yaml (the quality study's recipe) parses, `--exit_layers 30` turns it into the SFT
baseline with everything else equal, and it trains at any --max_steps (tiny model, 2 steps)."""

from __future__ import annotations

from example_runs import RECIPES, gsm8k_rows, run_example, save_tiny_model, step_logs, write_jsonl

from soft_peft.exits import parse_exit_layers
from soft_peft.scripts.train import parse_args

RECIPE = RECIPES / "smollm2_135m_gsm8k_soft.yaml"


def test_recipe_parses_and_exit_layers_30_is_the_sft_baseline():
    soft_script, soft, soft_model = parse_args(["--config", str(RECIPE)])
    sft_script, sft, sft_model = parse_args(["--config", str(RECIPE), "--exit_layers", "30"])
    assert soft.exit_layers == [9, 12, 15, 18, 21, 24, 27, 30] and soft.exit_loss_weights == "uniform"
    assert parse_exit_layers(sft.exit_layers, 30) == [30]
    assert (soft.max_steps, soft.per_device_train_batch_size, soft.max_length) == (400, 4, 256)
    assert (soft.learning_rate, soft.seed, soft.data_seed, soft.lr_scheduler_type.value) == (1e-4, 0, 0, "cosine")
    # The curriculum is off, and nothing but the exits differs between the two runs
    assert (soft.exit_ramp_steps, soft.exit_rotation) == (0, 0)
    differing = {k for k, v in soft.to_dict().items() if sft.to_dict()[k] != v}
    assert differing == {"exit_layers"}
    assert soft_script == sft_script and soft_model == sft_model
    assert soft_script.dataset_format == "gsm8k"


def test_recipe_trains_a_tiny_model_at_any_max_steps(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    argv = ["--config", str(RECIPE), "--model_name_or_path", str(model), "--dataset_name", str(data)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1", "--max_length", "64"]
    argv += ["--exit_layers", "1,2,4", "--exit_rotation", "1"]
    assert run_example("gsm8k", argv, monkeypatch) == 0
    logs = step_logs(tmp_path / "out")
    assert sorted(logs) == [1, 2]
    # One of the two early exits per step, in turn; the last layer every step
    assert {"exit_1/loss", "exit_4/loss"} <= set(logs[1]) and "exit_2/loss" not in logs[1]
    assert {"exit_2/loss", "exit_4/loss"} <= set(logs[2]) and "exit_1/loss" not in logs[2]
    assert [logs[2][f"exit_{k}/weight"] for k in (1, 2, 4)] == [0.0, 2 / 3, 1 / 3]
