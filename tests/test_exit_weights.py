"""`soft_peft.exit_weights`: the ``exit_loss_weights`` schemes and explicit weights, normalised, and every invalid
setting refused with the fix in the message."""

import pytest

from soft_peft.exit_weights import exit_loss_weights, parse_exit_loss_weights


@pytest.mark.parametrize(
    "spec, expected",
    [("uniform", [0.25] * 4), ("linear", [0.1, 0.2, 0.3, 0.4]), ("1,1,1,5", [0.125, 0.125, 0.125, 0.625])],
)
def test_exit_loss_weights(spec, expected):
    assert exit_loss_weights(spec, [1, 2, 3, 4]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "spec, message",
    [([1.0], "one weight per exit"), ([1, -1], "negative"), ([0, 0], "at least one weight"), ("fancy", "'uniform'")],
)
def test_invalid_weights(spec, message):
    with pytest.raises(ValueError, match=message):
        exit_loss_weights(spec, [1, 2])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("last:0.5", [0.125, 0.125, 0.125, 0.125, 0.5]),
        ("LAST:1", [0.0, 0.0, 0.0, 0.0, 1.0]),
    ],
)
def test_last_share_weights(spec, expected):
    assert exit_loss_weights(spec, [1, 2, 3, 4, 5]) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["last:0", "LAST:0.0"])
def test_a_zero_last_share_is_refused_with_the_explicit_alternative(spec):
    with pytest.raises(
        ValueError,
        match=r"gives the deepest exit \(with the default exits, the full model\) weight 0.*such as '1,1,0'",
    ):
        exit_loss_weights(spec, [1, 2, 3])
    with pytest.raises(ValueError, match="weight 0"):
        parse_exit_loss_weights(spec)


def test_explicit_weights_follow_the_written_exit_order():
    # exit_layers=[30, 9] with weights [1, 0]: the full model (30) gets 1, exit 9 gets 0
    assert exit_loss_weights([1, 0], [9, 30], written_order=[30, 9]) == [0.0, 1.0]
    assert exit_loss_weights("3,1,0", [4, 8, 12], written_order=[8, 12, 4]) == pytest.approx([0, 0.75, 0.25])
    # Schemes are about depth, not the written order: "last" is the deepest exit
    assert exit_loss_weights("last:0.5", [9, 30], written_order=[30, 9]) == [0.5, 0.5]
    assert exit_loss_weights("linear", [1, 3], written_order=[3, 1]) == [0.25, 0.75]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("inf,1,1", "negative, NaN or infinite"),
        ("nan,1", "negative, NaN or infinite"),
        ([1.0, float("-inf")], "negative, NaN or infinite"),
        ("1e308,1e308,1", "which overflows"),
        ("0,0,0", "at least one weight must be positive"),
        ("1,-1,1", "negative, NaN or infinite"),
        ([1, "x"], "not a number"),
    ],
)
def test_non_finite_or_overflowing_weights_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_exit_loss_weights(spec)
    with pytest.raises(ValueError, match=message):
        exit_loss_weights(spec, [1, 2, 3][: len(spec) if isinstance(spec, list) else spec.count(",") + 1])


@pytest.mark.parametrize("spec", ["last:1.5", "last:-0.1", "last:", "last:half", "last:nan", "last:inf"])
def test_invalid_last_share_raises(spec):
    with pytest.raises(ValueError, match="share must be a number in"):
        exit_loss_weights(spec, [1, 2])
