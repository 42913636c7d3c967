"""The GSM8K recipes: `smollm2_135m_gsm8k_soft.yaml` (the quality study's base: the paper's loss) and
`smollm2_135m_gsm8k_recommended.yaml` (the settings the study recommends). Each parses, `--exit_layers 30` turns it
into its SFT baseline with everything else equal (and with the last exit alone the loss is plain SFT's), and it trains
at any --max_steps (tiny model, 2 steps)."""

from __future__ import annotations

import pytest
from example_runs import RECIPES, gsm8k_rows, run_example, save_tiny_model, step_logs, write_jsonl

from soft_peft.cli.train_args import parse_args
from soft_peft.exit_weights import DEFAULT_EXIT_LOSS_WEIGHTS, exit_loss_weights
from soft_peft.exits import parse_exit_layers
from soft_peft.schedule import scheduled_exit_weights

BASE = RECIPES / "smollm2_135m_gsm8k_soft.yaml"
RECOMMENDED = RECIPES / "smollm2_135m_gsm8k_recommended.yaml"
LAYERSKIP = RECIPES / "smollm2_135m_gsm8k_layerskip.yaml"
SMOLLM2_EXITS = [9, 12, 15, 18, 21, 24, 27, 30]


@pytest.mark.parametrize("recipe, weights, rotation", [(BASE, "uniform", 0), (RECOMMENDED, "last:0.75", 2)])
def test_recipe_parses_and_exit_layers_30_is_the_sft_baseline(recipe, weights, rotation):
    soft_script, soft, soft_model = parse_args(["--config", str(recipe)])
    sft_script, sft, sft_model = parse_args(["--config", str(recipe), "--exit_layers", "30"])
    assert soft.exit_layers == SMOLLM2_EXITS and soft.exit_loss_weights == weights
    sft_exits = parse_exit_layers(sft.exit_layers, 30)
    assert sft_exits == [30] and exit_loss_weights(sft.exit_loss_weights, sft_exits) == [1.0]  # plain SFT's loss
    # ... at every step: the schedule has no early exit to ramp or rotate
    assert all(scheduled_exit_weights([1.0], step, sft.exit_schedule()) == [1.0] for step in range(8))
    assert (soft.max_steps, soft.per_device_train_batch_size, soft.max_length) == (400, 4, 256)
    assert (soft.learning_rate, soft.seed, soft.data_seed, soft.lr_scheduler_type.value) == (1e-4, 0, 0, "cosine")
    # No ramp; the recommended recipe rotates; nothing but the exits differs between the two runs
    assert (soft.exit_ramp_steps, soft.exit_rotation) == (0, rotation)
    differing = {k for k, v in soft.to_dict().items() if sft.to_dict()[k] != v}
    assert differing == {"exit_layers"}
    assert soft_script == sft_script and soft_model == sft_model
    assert soft_script.dataset_format == "gsm8k"


def test_the_recommended_recipe_is_the_studys_measured_run():
    """What the recipe recommends is what the study measured (its base recipe plus the `last_75_rotate2` run's
    flags), with `SoFTConfig`'s default loss weights."""
    from benchmarks.quality_study import RUNS

    _, measured, _ = parse_args(["--config", str(BASE), *RUNS["last_75_rotate2"].split()])
    _, recommended, _ = parse_args(["--config", str(RECOMMENDED)])
    differing = {k for k, v in recommended.to_dict().items() if measured.to_dict()[k] != v}
    assert differing == {"output_dir"}
    assert recommended.exit_loss_weights == DEFAULT_EXIT_LOSS_WEIGHTS


def test_the_layerskip_recipe_is_the_studys_run_and_its_baseline_is_sft():
    """LayerSkip's recipe is the study's `layerskip` run (its base recipe plus the run's flags); with
    `--exit_layers 30 --layer_dropout 0` only the last exit trains, without dropout: plain SFT."""
    from benchmarks.quality_study import RUNS

    _, measured, _ = parse_args(["--config", str(BASE), *RUNS["layerskip"].format(stop=31).split()])
    _, layerskip, _ = parse_args(["--config", str(LAYERSKIP)])
    differing = {k for k, v in layerskip.to_dict().items() if measured.to_dict()[k] != v}
    assert differing == {"output_dir"}
    assert parse_exit_layers(layerskip.exit_layers, 30) == list(range(1, 31))
    assert layerskip.layer_dropout_settings().layer_rates(30, 0)[-1] == pytest.approx(0.1)
    _, sft, _ = parse_args(["--config", str(LAYERSKIP), "--exit_layers", "30", "--layer_dropout", "0"])
    assert exit_loss_weights(sft.exit_loss_weights, parse_exit_layers(sft.exit_layers, 30)) == [1.0]
    assert not sft.layer_dropout_settings().enabled


@pytest.mark.parametrize("recipe", [BASE, RECOMMENDED, LAYERSKIP], ids=["base", "recommended", "layerskip"])
def test_recipe_trains_a_tiny_model_at_any_max_steps(tmp_path, monkeypatch, recipe):
    model = save_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows())
    argv = ["--config", str(recipe), "--model_name_or_path", str(model), "--dataset_name", str(data)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1", "--max_length", "64"]
    argv += ["--exit_layers", "1,2,4", "--exit_rotation", "1"]
    assert run_example("gsm8k", argv, monkeypatch) == 0
    logs = step_logs(tmp_path / "out")
    assert sorted(logs) == [1, 2]
    # One of the two early exits per step, in turn; the last layer every step
    assert {"exit_1/loss", "exit_4/loss"} <= set(logs[1]) and "exit_2/loss" not in logs[1]
    assert {"exit_2/loss", "exit_4/loss"} <= set(logs[2]) and "exit_1/loss" not in logs[2]
    # The rotated exit carries the early exits' whole share: 2/3 under uniform weights, 1/4 under last:0.75
    early, last = {BASE: (2 / 3, 1 / 3), RECOMMENDED: (0.25, 0.75), LAYERSKIP: (0.5, 0.5)}[recipe]
    assert [logs[2][f"exit_{k}/weight"] for k in (1, 2, 4)] == pytest.approx([0.0, early, last])
    for step, active in ((1, 1), (2, 2)):
        expected = early * logs[step][f"exit_{active}/loss"] + last * logs[step]["exit_4/loss"]
        assert logs[step]["loss"] == pytest.approx(expected, rel=1e-3)
