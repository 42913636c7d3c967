"""`soft_peft.exit_forward`: the settings of a SoFT forward are checked when built and cannot drift afterwards."""

import dataclasses

import pytest

from soft_peft.exit_forward import ExitLossSettings
from soft_peft.schedule import ExitSchedule


def test_defaults_are_the_papers_loss():
    settings = ExitLossSettings(exit_layers=(2, 4), weights=(0.5, 0.5))
    assert (settings.head_grad, settings.distill_weight, settings.schedule) == ("all", 0.0, None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weights": (1.0,)}, "1 exit weights for 2 exits"),
        ({"kernel": "triton"}, "kernel must be one of"),
        ({"token_weighting": "focal"}, "token_weighting must be one of"),
        ({"vocab_chunk_size": 0}, "vocab_chunk_size must be a positive integer"),
        ({"vocab_chunk_size": 2.5}, "vocab_chunk_size must be a positive integer"),
        ({"head_grad": "none"}, "exit_head_grad must be one of"),
        ({"distill_weight": 1.5}, "exit_distill_weight must be in \\[0, 1\\]"),
        ({"distill_temperature": 0.0}, "exit_distill_temperature must be > 0"),
    ],
)
def test_every_bad_value_is_refused_with_its_name(changes, message):
    with pytest.raises(ValueError, match=message):
        ExitLossSettings(**{"exit_layers": (2, 4), "weights": (0.5, 0.5), **changes})


def test_a_schedule_that_would_train_nothing_is_refused_at_once():
    # Only the shallowest exit has weight, and a deepest-first ramp starts it last: step 0 would train nothing
    with pytest.raises(ValueError, match="every exit at weight 0"):
        ExitLossSettings(exit_layers=(1, 2, 4), weights=(1.0, 0.0, 0.0), schedule=ExitSchedule(ramp_steps=6))


def test_settings_are_frozen():
    settings = ExitLossSettings(exit_layers=(2, 4), weights=(0.5, 0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.kernel = "torch"
