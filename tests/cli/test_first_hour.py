"""What a newcomer meets in the first hour with the command line (issue 35, items 14, 15, 16, 18 and 19): `train
--help` leads with the SoFT settings and `--config`; a run whose learning rate is 0 at every step says so before
loading; a GPU DeepSpeed launch on a CPU names the CPU config; no TRL deprecation warning on every run; eval, extract
and generate refuse in one line, take `--config` and name the evaluated split as training does; the eval report
describes only the columns it has."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from train_cli_helpers import Loaded, refuse_loading, train_argv, train_error

import soft_peft.evaluation.pipeline as pipeline
from soft_peft import SoFTConfig
from soft_peft.cli import main as soft_peft_main
from soft_peft.cli.lr_schedule import zero_learning_rate_warning
from soft_peft.evaluation.report import _report_lines


def test_train_help_leads_with_config_and_the_soft_settings(capsys):
    assert soft_peft_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: soft-peft train [--config NAME|FILE]")
    intro = out[: out.index("SoFT settings")]
    assert "--config NAME|FILE" in intro and "soft-peft recipes list" in intro
    headings = [line for line in out.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert headings[0].startswith("SoFT settings") and headings[1] == "soft-peft run options:"
    soft, trl = out.index("SoFT settings"), out.index("TRL and transformers options")

    def listed(flag: str) -> int:  # where the flag's own help entry starts
        return out.index(f"\n  {flag} ")

    assert soft < listed("--exit_layers") < listed("--exit_rotation") < listed("--dataset_format") < trl
    assert trl < listed("--learning_rate") and trl < listed("--dataset_train_split")


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("soft-peft train: warning: ")]


def test_a_run_at_learning_rate_zero_at_every_step_says_so_before_loading(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch, capsys
):
    refuse_loading(monkeypatch)
    # A shipped recipe's warm-up ratio (0.05) over 1 step: 1 warm-up step, which trains at rate 0
    argv = train_argv(tiny_model_dir, alpaca_file, tmp_path / "out", "--max_steps", "1", "--warmup_steps", "0.05")
    with pytest.raises(Loaded):
        soft_peft_main(["train", *argv])
    (line,) = warnings_of(capsys.readouterr().err)
    assert "learning rate is 0 at every one of the 1 training step(s)" in line and "--max_steps" in line
    argv[argv.index("--max_steps") + 1] = "3"  # 1 warm-up step of 3: steps 2 and 3 train
    with pytest.raises(Loaded):
        soft_peft_main(["train", *argv])
    assert warnings_of(capsys.readouterr().err) == []


@pytest.mark.parametrize(
    ("settings", "trains"),
    [
        (dict(max_steps=1, warmup_steps=0.05), False),
        (dict(max_steps=1, warmup_steps=1, lr_scheduler_type="constant_with_warmup"), False),
        (dict(max_steps=3, warmup_steps=3), True),  # warm-up's rate is 0 at step 1 only
        (dict(max_steps=5, learning_rate=0.0), False),
        (dict(max_steps=2, lr_scheduler_type="cosine", warmup_steps=0.5), True),
        (dict(max_steps=1, lr_scheduler_type="cosine"), True),
        (dict(max_steps=-1, num_train_epochs=1, warmup_steps=5), True),  # counted in epochs: unknown before loading
    ],
)
def test_the_zero_rate_check_follows_the_trainers_schedule(settings, trains, tmp_path):
    args = SoFTConfig(str(tmp_path), bf16=False, report_to="none", **settings)
    # The reference: the rate `Trainer` itself gives each step, from the scheduler it builds
    from transformers import Trainer

    model = torch.nn.Linear(1, 1)
    trainer = Trainer(model=model, args=args)
    steps = max(args.max_steps, 1)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    if args.max_steps > 0:
        assert any(rate > 0 for rate in rates) == trains
    assert (zero_learning_rate_warning(args) is None) == trains


def test_a_gpu_deepspeed_launch_on_a_cpu_names_the_cpu_config(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch, capsys
):
    if torch.cuda.is_available():
        pytest.skip("a machine without GPUs")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets from zero3.yaml
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    error = train_error(capsys, train_argv(tiny_model_dir, alpaca_file, tmp_path / "out"))
    assert "soft-peft recipes path accelerate/zero3_cpu" in error


def test_a_deepspeed_launch_on_a_cpu_trains_over_gloo(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a machine without GPUs")
    from soft_peft.cli.train_args import make_parser

    assert make_parser().get_default("ddp_backend") is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # zero3_cpu.yaml's launch
    assert make_parser().get_default("ddp_backend") == "gloo"


def test_no_gradient_checkpointing_deprecation_on_every_run(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_error(capsys, ["--model_name_or_path", str(tmp_path / "missing"), "--dataset_name", "x.jsonl"])
        args = SoFTConfig(str(tmp_path), bf16=False)
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert args.activation_checkpointing and args.gradient_checkpointing  # TRL's default: on
    with warnings.catch_warnings(record=True) as caught:  # the deprecated name, set: honoured, and transformers warns
        warnings.simplefilter("always")
        args = SoFTConfig(str(tmp_path), bf16=False, gradient_checkpointing=False)
    assert not args.activation_checkpointing and any("gradient_checkpointing" in str(w.message) for w in caught)


@pytest.mark.parametrize("command", ["eval", "extract", "generate"])
def test_refusals_are_one_line_without_the_usage(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        soft_peft_main([command, "--model_name_or_path", "m", "--no_such_flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"soft-peft {command}: error: ") and "usage:" not in err


def write_recipe(path, **keys):
    path.write_text(yaml.safe_dump(keys))
    return str(path)


def test_eval_reads_a_recipes_model_and_dataset_keys_and_lists_the_rest(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("matplotlib")
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        model_name_or_path=str(tiny_model_dir),
        dataset_name=str(alpaca_file),
        dataset_format="alpaca",
        max_length=77,
        learning_rate=1e-4,
        output_dir="runs/trained",
    )
    seen = []
    monkeypatch.setattr(pipeline, "run_evaluation", lambda settings: seen.append(settings) or {"exits": [2, 4]})
    out = tmp_path / "eval"
    argv = ["eval", "--config", recipe, "--output_dir", str(out), "--exits", "2,4", "--max_length", "50"]
    assert soft_peft_main(argv) == 0
    (settings,) = seen
    assert (settings.model_name_or_path, settings.dataset_name) == (str(tiny_model_dir), str(alpaca_file))
    assert (settings.dataset_format, settings.dataset_test_split) == ("alpaca", "test")  # TRL's name and default
    assert settings.max_length == 50 and settings.output_dir == str(out)  # the command line wins
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"soft-peft eval: --config {recipe}: not used here: ")
    assert "learning_rate" in line and "output_dir (training's folder" in line and "max_length" not in line


def test_eval_names_the_split_as_training_does(capsys):
    with pytest.raises(SystemExit):
        soft_peft_main(
            ["eval", "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]
            + ["--dataset_split", "test"]
        )
    assert "unrecognized arguments: --dataset_split" in capsys.readouterr().err


def test_generate_and_extract_read_the_recipes_model(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", model_name_or_path=str(tiny_model_dir), exit_layers="2,4")
    argv = ["generate", "--config", recipe, "--prompt", "Add 2 and 3.", "--num_layers", "2", "--max_new_tokens", "2"]
    assert soft_peft_main(argv) == 0
    err = capsys.readouterr().err
    assert f"soft-peft generate: --config {recipe}: not used here: exit_layers" in err
    out = tmp_path / "sub"
    assert soft_peft_main(["extract", "--config", recipe, "--num_layers", "2", "--output_dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_the_eval_report_describes_only_its_columns(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    settings = {"dataset_name": str(data), "dataset_format": "alpaca", "num_examples": 1, "num_tokens": 3}
    plain = "\n".join(_report_lines(["m"], ["m"], [{2: {"loss": 1.0}}], {}, settings, None))
    assert "ms_per_token" not in plain and "held-out loss" not in plain and "split" not in plain
    timed = "\n".join(_report_lines(["m"], ["m"], [{2: {"loss": 1.0, "ms_per_token": 3.0}}], {}, settings, None))
    assert "`ms_per_token` is greedy" in timed
    hub = "\n".join(
        _report_lines(
            ["m"],
            ["m"],
            [{2: {"loss": 1.0}}],
            {},
            {**settings, "dataset_name": "org/data", "dataset_test_split": "test"},
            None,
        )
    )
    assert "split `test`" in hub
