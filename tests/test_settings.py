"""[`SoFTSettings`]: one object, checked once when built, copied with overrides by `soft_settings`."""

import dataclasses

import pytest

from soft_peft import SoFTConfig, SoFTSettings
from soft_peft.loss import ExitLossOptions
from soft_peft.settings import soft_settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"loss_type": "focal"}, "loss_type must be one of"),
        ({"exit_loss_kernel": "triton"}, "exit_loss_kernel must be one of"),
        ({"exit_vocab_chunk_size": 0}, "exit_vocab_chunk_size must be a positive integer"),
        ({"exit_head_grad": "none"}, "exit_head_grad must be one of"),
        ({"exit_distill_weight": 1.5}, "exit_distill_weight must be in \\[0, 1\\]"),
        ({"exit_distill_temperature": 0.0}, "exit_distill_temperature must be > 0"),
        ({"exit_layers": "4,4"}, "exit_layers=\\[4, 4\\] has duplicates"),
        ({"exit_layers": "2,4", "exit_loss_weights": "1,2,3"}, "3 values but there are 2 exits \\[2, 4\\]"),
        ({"exit_ramp_order": "shallow"}, "exit_ramp_order must be one of"),
        ({"layer_dropout": 1.0}, "layer_dropout must be a probability in \\[0, 1\\)"),
    ],
)
def test_every_bad_value_is_refused_with_its_name_when_built(values, message):
    with pytest.raises(ValueError, match=message):
        SoFTSettings(**values)


def test_the_loss_reads_its_knobs_from_the_same_fields():
    # A SoFTSettings is the loss's ExitLossOptions: no field is copied under another name
    assert issubclass(SoFTSettings, ExitLossOptions)
    option_names = {f.name for f in dataclasses.fields(ExitLossOptions)}
    assert option_names == {
        "loss_type",
        "exit_loss_kernel",
        "exit_vocab_chunk_size",
        "exit_head_grad",
        "exit_distill_weight",
        "exit_distill_temperature",
    }


def test_command_line_strings_and_python_lists_are_both_kept(tmp_path):
    assert SoFTSettings(exit_layers=" 2,4 ", exit_loss_weights=" none ").exit_layers == "2,4"
    assert SoFTSettings(exit_loss_weights=" none ").exit_loss_weights == "last:0.75"  # the default
    assert SoFTSettings(exit_layers=(2, 4)).exit_layers == [2, 4]


def test_soft_settings_copies_only_the_soft_fields_and_applies_overrides(tmp_path):
    config = SoFTConfig(str(tmp_path), use_cpu=True, bf16=False, exit_layers="2,4", exit_head_grad="last")
    settings = soft_settings(config, exit_distill_weight=0.5)
    assert type(settings) is SoFTSettings
    assert (settings.exit_layers, settings.exit_head_grad, settings.exit_distill_weight) == ("2,4", "last", 0.5)
    assert config.exit_distill_weight == 0.0
    with pytest.raises(TypeError, match=r"\['kernel', 'weights'\] are not SoFT settings; .*exit_loss_kernel"):
        soft_settings(kernel="torch", weights=[1, 2])
    with pytest.raises(ValueError, match="exit_distill_weight must be in"):
        soft_settings(config, exit_distill_weight=2.0)


def test_every_soft_field_is_declared_with_its_help_in_settings_and_the_loss_options_agree():
    # One home: each SoFTSettings field, the loss knobs included, carries its command-line help from settings.py; the
    # loss's small options object carries none, and has the same defaults
    declared_here = SoFTSettings.__dict__["__annotations__"]
    for f in dataclasses.fields(SoFTSettings):
        assert f.name in declared_here, f.name
        assert f.metadata.get("help"), f.name
    for f in dataclasses.fields(ExitLossOptions):
        assert not f.metadata, f.name
    loss_defaults = dataclasses.asdict(ExitLossOptions())
    assert {name: getattr(SoFTSettings(), name) for name in loss_defaults} == loss_defaults
