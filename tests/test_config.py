"""[`SoFTConfig`] and [`read_soft_settings`]: the SoFT fields, their checks, and parsing from the command line."""

import dataclasses

import pytest
from trl import SFTConfig, TrlParser

import soft_peft.config
from soft_peft import SoFTConfig, SoFTSettings
from soft_peft.config import read_soft_settings


def config(tmp_path, **overrides):
    return SoFTConfig(**{"output_dir": str(tmp_path / "out"), "use_cpu": True, "bf16": False, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"exit_layers": "1,1"}, "duplicates"),
        ({"exit_loss_weights": "1,-2"}, "negative"),
        ({"exit_layers": "2,4", "exit_loss_weights": "1,2,3"}, "one weight per exit"),
        ({"exit_loss_weights": "last:2"}, "share must be a number in"),
        ({"exit_head_grad": "first"}, "exit_head_grad"),
        ({"exit_distill_weight": 2.0}, "exit_distill_weight"),
        ({"exit_distill_temperature": -1.0}, "exit_distill_temperature"),
        ({"exit_loss_weights": "inf,1"}, "infinite"),
        ({"exit_loss_weights": "1e308,1e308,1"}, "overflows"),
        ({"exit_loss_weights": "last:0"}, "weight 0"),
        # TrainingArguments values torch or the loop would reject only after the model loads
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0 is out of range"),
        ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size=0"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"learning_rate": float("nan")}, "learning_rate=nan"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"adam_beta1": 1.5}, "adam_beta1"),
        ({"adam_beta2": -0.1}, "adam_beta2"),
        ({"adam_epsilon": -1.0}, "adam_epsilon"),
        ({"max_steps": -5}, "max_steps=-5 .* or -1 to train num_train_epochs"),
        ({"num_train_epochs": 0}, "num_train_epochs=0 .* would train no step"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers"),
        ({"max_length": 0}, "max_length=0"),
        ({"save_strategy": "steps", "save_steps": 0}, "save_steps=0"),
        ({"eval_accumulation_steps": 0}, "eval_accumulation_steps=0"),
    ],
)
def test_bad_config_raises(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"max_steps": -1}, {"max_steps": 0, "num_train_epochs": 1}, {"max_steps": 3, "num_train_epochs": 0}, {}],
)
def test_training_numbers_in_range_pass(tmp_path, overrides):
    config(tmp_path, learning_rate=0.0, **overrides)


def test_training_numbers_are_checked_for_any_arguments_the_trainer_gets(tmp_path):
    # A plain SFTConfig reaches SoFTTrainer through `read_soft_settings`, before the model loads
    plain = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=0)
    with pytest.raises(ValueError, match="per_device_train_batch_size=0 is out of range: it must be an integer >= 1"):
        read_soft_settings(plain)


def test_config_checks_exit_syntax_without_a_depth(tmp_path):
    # Without a model the message names what is known: layers counted from 1, and examples that fit any depth
    with pytest.raises(
        ValueError,
        match=r"exit_layers has \[0\], but layers are counted from 1 .* Exits are distinct layer numbers from 1 to "
        r"the model's depth, e\.g\. exit_layers='9,12,15' or the slice '9::3'",
    ):
        config(tmp_path, exit_layers="0")
    # an open slice's count is unknown until the depth is: the weights' count is checked by the trainer
    assert config(tmp_path, exit_layers="9::3", exit_loss_weights="1,2").exit_layers == "9::3"


def test_quality_controls_parse_from_the_command_line(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--use_cpu", "--exit_loss_weights", "last:0.5", "--exit_head_grad", "last"]
    flags += ["--exit_distill_weight", "0.25", "--exit_distill_temperature", "2"]
    (args,) = TrlParser((SoFTConfig,)).parse_args_into_dataclasses(args=flags)
    assert (args.exit_loss_weights, args.exit_head_grad) == ("last:0.5", "last")
    assert (args.exit_distill_weight, args.exit_distill_temperature) == (0.25, 2.0)


def test_soft_settings_are_read_from_a_soft_config_and_default_for_a_plain_sft_config(tmp_path):
    settings = read_soft_settings(config(tmp_path, exit_layers="2, 4", exit_loss_weights="1,3"))
    assert (settings.exit_layers, settings.exit_loss_weights) == ("2, 4", "1,3")
    plain = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert read_soft_settings(plain) == SoFTSettings()
    # Every SoFTSettings field is a SoFTConfig field, with the same default
    defaults = {f.name: f.default for f in dataclasses.fields(SoFTConfig)}
    assert all(defaults[f.name] == f.default for f in dataclasses.fields(SoFTSettings))


def test_loss_type_is_trls_field_with_the_values_soft_computes(tmp_path):
    assert config(tmp_path, loss_type="dft").loss_type == "dft"
    (args,) = TrlParser((SoFTConfig,)).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--use_cpu", "--loss_type", "dft"]
    )
    assert args.loss_type == "dft"
    # A plain SFTConfig's loss type reaches the settings
    plain = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type="dft")
    assert read_soft_settings(plain).loss_type == "dft"
    assert [f.name for f in dataclasses.fields(SoFTConfig)].count("loss_type") == 1


def test_soft_settings_are_checked_once_on_the_way_to_the_trainer(tmp_path, monkeypatch):
    # Each check counted: building a SoFTConfig checks it; reading its settings for the trainer copies them unchecked
    calls = {"settings": 0, "numbers": 0}
    settings_check, numbers_check = SoFTSettings.__post_init__, soft_peft.config.check_training_numbers

    def counted_settings_check(self):
        calls["settings"] += 1
        settings_check(self)

    def counted_numbers_check(args):
        calls["numbers"] += 1
        numbers_check(args)

    monkeypatch.setattr(SoFTSettings, "__post_init__", counted_settings_check)
    monkeypatch.setattr(soft_peft.config, "check_training_numbers", counted_numbers_check)
    soft = config(tmp_path, exit_layers=[2, 4], exit_loss_weights="1,3", exit_head_grad="last")
    assert calls == {"settings": 1, "numbers": 1}
    settings = read_soft_settings(soft)
    assert calls == {"settings": 1, "numbers": 1}
    assert type(settings) is SoFTSettings
    assert dataclasses.asdict(settings) == {f.name: getattr(soft, f.name) for f in dataclasses.fields(SoFTSettings)}
    assert settings.exit_layers == [2, 4] and settings.exit_layers is not soft.exit_layers
    # A plain SFTConfig was never checked for SoFT: reading it checks everything, once
    read_soft_settings(SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False))
    assert calls == {"settings": 2, "numbers": 2}
