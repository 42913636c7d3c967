import re

import pytest
from tiny_models import tiny_model

from soft_peft import recorded_exit_layers
from soft_peft.exits import default_exit_layers, parse_exit_layers, parse_exit_spec, record_exit_layers


def test_default_exits_match_the_paper_for_40_layers():
    assert default_exit_layers(40) == [12, 16, 20, 24, 28, 32, 36, 40]


@pytest.mark.parametrize(
    "num_layers, expected",
    [(30, [9, 12, 15, 18, 21, 24, 27, 30]), (32, [10, 13, 16, 19, 22, 26, 29, 32]), (4, [1, 2, 3, 4]), (1, [1])],
)
def test_default_exits_scale_with_depth(num_layers, expected):
    assert default_exit_layers(num_layers) == expected


@pytest.mark.parametrize(
    "spec, expected",
    [
        ([3, 1], [1, 3]),
        ("12:41:4", [12, 16, 20, 24, 28, 32, 36, 40]),
        ("30:", [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]),
        ("4,8, 40", [4, 8, 40]),
        (None, [12, 16, 20, 24, 28, 32, 36, 40]),
    ],
)
def test_parse_exit_layers(spec, expected):
    assert parse_exit_layers(spec, 40) == expected


@pytest.mark.parametrize("spec", [[0, 4], [41], [4, 4], [2.0, 4], "a,b", "1:10:0", "50:60", [True]])
def test_invalid_exit_layers_name_depth_and_example(spec):
    with pytest.raises(ValueError, match=r"40 decoder layers.*e\.g\. exit_layers=\[12,16"):
        parse_exit_layers(spec, 40)


@pytest.mark.parametrize("spec", [[0, 4], [41], [4, 4], [2.0, 4], "a,b", "1:10:0", "50:60", [True]])
def test_invalid_exits_of_an_operation_are_named_by_their_setting(spec):
    # The exits a decoder or evaluation uses are `exits`; `exit_layers` names only the trained exits
    with pytest.raises(ValueError, match=r"^exits.*40 decoder layers.*e\.g\. exits=\[12,16") as error:
        parse_exit_layers(spec, 40, "exits")
    assert "exit_layers" not in str(error.value)


def test_exit_layers_are_recorded_in_the_config(tmp_path):
    model = tiny_model("llama")
    assert recorded_exit_layers(model) is None
    record_exit_layers(model, [2, 4])
    model.save_pretrained(tmp_path)
    assert '"soft_exit_layers": [\n    2,\n    4\n  ]' in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, None),
        ([3, 1], [1, 3]),
        ("4,8, 40", [4, 8, 40]),
        ("12:41:4", list(range(12, 41, 4))),
        ("9::3", slice(9, None, 3)),
    ],
)
def test_parse_exit_spec_needs_no_depth(spec, expected):
    assert parse_exit_spec(spec) == expected


@pytest.mark.parametrize("spec", [[0, 4], "0", [4, 4], [2.0, 4], "a,b", "1:10:0", "0:5", "5:3", [True], "1:2:3:4"])
def test_invalid_exit_spec_names_no_depth(spec):
    with pytest.raises(ValueError, match=r"from 1 to the model's depth, e\.g\. exit_layers='9,12,15'") as error:
        parse_exit_spec(spec)
    assert "decoder layers" not in str(error.value)  # no made-up depth


def test_open_slice_ends_at_the_depth():
    assert parse_exit_layers("9::3", 30) == [9, 12, 15, 18, 21, 24, 27, 30]
    with pytest.raises(ValueError, match="selects no layer. The model has 4 decoder layers"):
        parse_exit_layers("9::3", 4)


@pytest.mark.parametrize("num_layers", [30, 40, 32])
def test_an_out_of_range_exit_suggests_a_slice_that_parses(num_layers):
    with pytest.raises(ValueError, match="outside") as raised:
        parse_exit_layers([num_layers + 1], num_layers)
    suggested, meaning = re.search(r"slice string '([\d:]+)' \(([^)]+)\)", str(raised.value)).groups()
    layers = parse_exit_layers(suggested, num_layers)
    if meaning == "the same exits":
        assert layers == default_exit_layers(num_layers)
    else:  # 32 layers: the default is not evenly spaced
        assert layers == list(range(default_exit_layers(num_layers)[0], num_layers + 1))
