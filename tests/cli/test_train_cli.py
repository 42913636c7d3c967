"""`soft-peft train`: the recipe + overrides parser, and user errors as one line with exit code 2."""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml
from example_runs import TINY_TRAIN_ARGS, alpaca_rows, run, step_logs, write_jsonl

from soft_peft.cli import main as soft_peft_main
from soft_peft.cli.train import main as train_main
from soft_peft.cli.train_args import parse_args
from soft_peft.prompt_templates import ALPACA_PROMPT_NO_INPUT


def error_line(capsys, argv: list[str]) -> str:
    """Run `soft-peft train argv`, expect exit code 2 and one error line (progress bars aside), return it."""
    assert train_main(argv) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("soft-peft train: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_help_lists_train(capsys):
    assert soft_peft_main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


def test_recipe_values_and_command_line_overrides(tmp_path, alpaca_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "dataset_name": str(alpaca_file),
                "learning_rate": 2.0e-5,
                "exit_layers": "2,4",
                "lora_r": 8,
                "max_steps": 5,
            }
        )
    )
    script_args, training_args, model_args = parse_args(["--config", str(recipe), "--max_steps", "2"])
    assert script_args.dataset_name == str(alpaca_file) and script_args.dataset_format == "auto"
    assert training_args.learning_rate == 2.0e-5 and training_args.max_steps == 2  # the command line wins
    assert training_args.exit_layers == "2,4" and model_args.lora_r == 8


def test_train_from_recipe(tmp_path, tiny_model_dir, alpaca_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "dataset_name": str(alpaca_file)}))
    output_dir = tmp_path / "out"
    assert train_main(["--config", str(recipe), "--output_dir", str(output_dir), *TINY_TRAIN_ARGS]) == 0
    assert math.isfinite(step_logs(output_dir)[2]["exit_2/loss"])
    # The final save has its model card: TRL's, with the SoFT section
    card = (output_dir / "README.md").read_text()
    assert "## Sorted Fine-Tuning (SoFT)" in card and "| SoFT exits trained |" in card and "soft-peft" in card


def test_unknown_flag(capsys, alpaca_file):
    line = error_line(capsys, ["--dataset_name", str(alpaca_file), "--lora_rank", "8"])
    assert "unknown option(s) --lora_rank 8" in line


def test_unknown_recipe_key(capsys, tmp_path, alpaca_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"dataset_name": str(alpaca_file), "exit_layer": "2,4"}))
    assert "unknown key(s) ['exit_layer']" in error_line(capsys, ["--config", str(recipe)])


def test_missing_recipe_file(capsys, tmp_path):
    assert "no such file" in error_line(capsys, ["--config", str(tmp_path / "nope.yaml")])


def test_bad_value(capsys, alpaca_file):
    line = error_line(capsys, ["--dataset_name", str(alpaca_file), "--max_steps", "two"])
    assert "--max_steps" in line and "two" in line


def test_invalid_setting_from_config_validation(capsys, alpaca_file):
    line = error_line(capsys, ["--dataset_name", str(alpaca_file), "--exit_loss_weights", "1,-1"])
    assert "weight" in line.lower()


def test_missing_dataset_file(capsys, tmp_path, tiny_model_dir):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(tmp_path / "missing.jsonl")]
    assert "no such dataset file" in error_line(capsys, argv + ["--output_dir", str(tmp_path / "out")])


def test_dataset_without_needed_columns(capsys, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path)]
    line = error_line(capsys, argv + ["--dataset_format", "alpaca"])
    assert "Alpaca dataset needs columns ['instruction', 'output']" in line


def test_dataset_of_no_known_format(capsys, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"query": "2+2?", "reply": "4"}])
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path)]
    line = error_line(capsys, argv)
    assert "cannot tell the dataset format from its columns ['query', 'reply']" in line


@pytest.mark.parametrize("dataset_format", ["text", "prompt_completion"])
def test_trl_formats_train_as_sft_trainer_takes_them(tmp_path, tiny_model_dir, dataset_format):
    rows = alpaca_rows()
    if dataset_format == "text":
        rows = [{"text": f"{row['instruction']} {row['output']}"} for row in rows]
    else:
        rows = [{"prompt": row["instruction"], "completion": " " + row["output"]} for row in rows]
    data = write_jsonl(tmp_path / f"{dataset_format}.jsonl", rows)
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir)]
    assert train_main([*argv, *TINY_TRAIN_ARGS]) == 0  # dataset_format "auto"
    logs = step_logs(output_dir)
    assert math.isfinite(logs[2]["exit_2/loss"]) and math.isfinite(logs[2]["loss"])


def test_missing_local_model(capsys, tmp_path, alpaca_file):
    argv = ["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(alpaca_file)]
    assert "no such local folder (and not a Hub model id)" in error_line(capsys, argv)


def test_a_relative_path_that_could_be_a_hub_id_fails_at_once_offline(capsys, alpaca_file):
    start = time.perf_counter()
    line = error_line(capsys, ["--model_name_or_path", "runs/nothere", "--dataset_name", str(alpaca_file)])
    assert time.perf_counter() - start < 5.0  # not ~30 s of connection retries
    assert line.startswith(
        "soft-peft train: error: --model_name_or_path runs/nothere: no such local folder, and the Hub could not "
        "be reached (HF_HUB_OFFLINE=1 is set"
    )


def test_malformed_json_names_the_file_and_line(capsys, tmp_path, tiny_model_dir):
    lines = [json.dumps(row) for row in alpaca_rows(4)]
    lines[2] = lines[2][:-1]  # line 3 loses its closing brace
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n")
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path)]
    assert error_line(capsys, argv).startswith(f"soft-peft train: error: {data}, line 3: invalid JSON")


def test_every_row_longer_than_max_length_is_refused_before_training(capsys, tmp_path, tiny_model_dir, alpaca_file):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(alpaca_file)]
    argv += ["--output_dir", str(tmp_path / "out"), *TINY_TRAIN_ARGS, "--max_length", "16"]
    line = error_line(capsys, argv)
    # The tiny tokenizer has one token per character: the shortest Alpaca prompt is the no-input template's
    instruction = min((row["instruction"] for row in alpaca_rows() if not row["input"]), key=len)
    shortest = len(ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    assert line == (
        "soft-peft train: error: every one of the 16 train rows is longer than --max_length 16 and keeps no "
        f"completion token after truncation (truncation_mode keep_start; the shortest prompt alone is {shortest} "
        f"tokens). Raise --max_length (above {shortest}) or shorten the rows."
    )
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_all_completions_empty_is_refused(capsys, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "empty.jsonl", [{**row, "output": " "} for row in alpaca_rows(4)])
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path)]
    assert "all 4 completions (column 'output') are empty" in error_line(capsys, argv)


def test_console_script_error_has_no_traceback(tmp_path, alpaca_file):
    result = run(["soft-peft", "train", "--dataset_name", str(alpaca_file), "--bogus_flag", "1"], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "soft-peft train: error: unknown option(s) --bogus_flag 1; see --help for the accepted flags."
    )


def test_evaluation_on_a_single_local_file_needs_a_holdout(capsys, tmp_path, tiny_model_dir, alpaca_file):
    argv = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(alpaca_file),
        "--eval_strategy",
        "steps",
    ]
    assert "--eval_holdout_size" in error_line(capsys, argv + ["--output_dir", str(tmp_path / "out")])
