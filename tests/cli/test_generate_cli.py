"""`soft-peft generate` / `extract` / `eval`: every bad value is one argparse-style line (exit code 2) given before
the model's weights load, judged from its config; untrained exits get the same warning in every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import soft_peft.cli.generate
import soft_peft.inference.dynamic
from soft_peft import dynamic_generate, self_speculative_generate
from soft_peft.cli import main as soft_peft_main
from soft_peft.inference.dynamic import default_dynamic_exits

CONTEXT = 64  # max_position_embeddings of the saved tiny models


def save(folder: Path, exits: list[int] | None) -> str:
    model = tiny_model("llama")  # 4 decoder layers
    model.config.max_position_embeddings = CONTEXT
    if exits is not None:
        model.config.soft_exit_layers = exits
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def soft_model(tmp_path_factory):
    return save(tmp_path_factory.mktemp("soft"), [2, 4])


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return save(tmp_path_factory.mktemp("plain"), None)


class Loaded(Exception):
    pass


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the weights fails the test: every check below must come first."""

    def refuse(*args, **kwargs):
        raise Loaded("the weights were loaded before the flags were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def usage_error(capsys, argv: list[str], prog: str = "soft-peft generate") -> str:
    """Run `soft-peft argv`, expect argparse's exit code 2, and return its one error line."""
    with pytest.raises(SystemExit) as exited:
        soft_peft_main(argv)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft_exit", "0"], "`draft_exit` must be an int in 1..3 (the model has 4 layers"),
        (["--draft_exit", "4"], "and the last one verifies), got 4."),
        (["--draft_exit", "5"], "`draft_exit` must be an int in 1..3"),
        (["--num_layers", "5"], "--num_layers 5: must be in 1..4"),
        (["--thresholds", "x"], "argument --thresholds: 'x' is not a number or a comma-separated list of numbers"),
        (["--thresholds", "1.5"], "Thresholds must be in (0, 1], got [1.5]; 1.0 disables an exit."),
        (["--thresholds", "0.9", "--exits", "5"], "exits has [5] outside 1..4"),
        (["--thresholds", "0.9", "--exits", "x"], "exits='x' is not a list of integers."),
        (["--thresholds", "0.9,0.8", "--exits", "1,2,3"], "Got 2 thresholds for the 3 exits [1, 2, 3]"),
        (["--exits", "2"], "--exits chooses the exits of dynamic early exit: it needs --thresholds."),
        # Training's flag, brought to generate: the line names the flag generate takes
        (["--exit_layers", "15"], "the exits dynamic early exit checks are --exits, such as --thresholds 0.9"),
        (["--max_new_tokens", "0"], "argument --max_new_tokens: must be >= 1, got 0"),
        (["--num_draft_tokens", "0"], "argument --num_draft_tokens: must be >= 1, got 0"),
        (["--draft_exit", "2", "--early_draft_exits", "1"], "`early_draft_exits` needs `draft_stop_threshold`"),
        (["--draft_exit", "2", "--draft_stop_threshold", "0.5", "--early_draft_exits", "2"], "below `draft_exit` (2)"),
        (["--draft_exit", "2", "--draft_stop_threshold", "1"], "`draft_stop_threshold` must be in [0, 1)"),
        (["--draft_stop_threshold", "0.5"], "need --draft_exit"),
        (["--do_sample", "--temperature", "0"], "`temperature` must be > 0, got 0.0"),
        (["--do_sample", "--top_p", "1.5"], "`top_p` must be in (0, 1], got 1.5."),
        (["--draft_exit", "2", "--vocab_texts", "nope.txt"], "--vocab_texts nope.txt: no such file."),
        (["--vocab_texts", "nope.txt"], "--vocab_texts needs --draft_exit or --thresholds"),
        (["--max_new_tokens", "60", "--prompt", "hello"], "lower --max_new_tokens to 59"),
        (["--prompt", "x" * CONTEXT], f"the prompt is {CONTEXT} tokens, but "),
        (["--prompt", ""], "--prompt is empty: give the text to continue."),
    ],
)
def test_generate_bad_values_fail_before_loading(soft_model, capsys, no_loading, flags, message):
    # The tiny tokenizer gives one token per character and adds none: 'hello' is 5 tokens
    argv = ["generate", "--model_name_or_path", soft_model, "--prompt", "hi", "--max_new_tokens", "4", *flags]
    assert message in usage_error(capsys, argv)


def test_generate_checks_thresholds_against_the_default_exits_before_loading(soft_model, capsys, no_loading):
    # Four thresholds for the default dynamic exits ([2]: the recorded ones below the last layer)
    argv = ["generate", "--model_name_or_path", soft_model, "--prompt", "hi", "--thresholds", "0.5,0.5,0.5,0.5"]
    argv += ["--max_new_tokens", "4"]
    assert "Got 4 thresholds for the 1 exits [2]" in usage_error(capsys, argv)


@pytest.mark.parametrize(
    "flags, decoder_call",
    [
        (["--draft_exit", "0"], lambda m, ids: self_speculative_generate(m, ids, 0, 4)),
        (
            ["--draft_exit", "2", "--early_draft_exits", "1"],
            lambda m, ids: self_speculative_generate(m, ids, 2, 4, early_draft_exits=[1]),
        ),
        (
            ["--draft_exit", "3", "--draft_stop_threshold", "0.5", "--early_draft_exits", "2,1"],
            lambda m, ids: self_speculative_generate(m, ids, 3, 4, draft_stop_threshold=0.5, early_draft_exits=[2, 1]),
        ),
        (["--thresholds", "0"], lambda m, ids: dynamic_generate(m, ids, None, 0.0, 4)),
        (
            ["--thresholds", "0.9,0.8", "--exits", "1:4"],
            lambda m, ids: dynamic_generate(m, ids, "1:4", [0.9, 0.8]),
        ),
        (
            ["--draft_exit", "2", "--do_sample", "--top_p", "0"],
            lambda m, ids: self_speculative_generate(m, ids, 2, 4, do_sample=True, top_p=0.0),
        ),
    ],
)
def test_generate_refuses_with_the_decoders_own_message(soft_model, capsys, monkeypatch, flags, decoder_call):
    """The CLI runs the decoders' own checks, against the config, before loading: the same message, exit code 2."""
    model = AutoModelForCausalLM.from_pretrained(soft_model).eval()
    with pytest.raises(ValueError) as raised:
        decoder_call(model, torch.tensor([[5, 6, 7]]))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", Loaded)  # loading now fails the test
    argv = ["generate", "--model_name_or_path", soft_model, "--prompt", "hi", "--max_new_tokens", "4", *flags]
    assert usage_error(capsys, argv) == f"soft-peft generate: error: {raised.value}"


def test_generate_default_dynamic_exits_are_the_decoders(tmp_path, capsys, monkeypatch):
    """Without --exits, dynamic early exit checks `default_dynamic_exits` of the model's recorded exits: at most
    three of the upper half, here 4, 6 and 7 of 4, 5, 6, 7 (not all four)."""
    model = tiny_model("llama", num_hidden_layers=8)
    model.config.soft_exit_layers = [2, 4, 5, 6, 7, 8]
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    expected = default_dynamic_exits(8, [2, 4, 5, 6, 7, 8])
    assert expected == [4, 6, 7]
    calls = []

    def recording(model, input_ids, exits, thresholds, *args, **kwargs):
        calls.append((list(exits), thresholds))
        return dynamic_generate(model, input_ids, exits, thresholds, *args, **kwargs)

    monkeypatch.setattr(soft_peft.inference.dynamic, "dynamic_generate", recording)  # where the command imports it
    argv = ["generate", "--model_name_or_path", str(tmp_path), "--prompt", "hi", "--max_new_tokens", "3"]
    assert soft_peft_main([*argv, "--thresholds", "0.5"]) == 0
    assert soft_peft_main([*argv, "--thresholds", "0.5,0.6,0.7"]) == 0  # one threshold per default exit
    assert calls == [(expected, [0.5, 0.5, 0.5]), (expected, [0.5, 0.6, 0.7])]
    stats = json.loads(capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[1])
    assert len(stats["exits_taken"]) == 3 and set(stats["exits_taken"]) <= {*expected, 8}


@pytest.mark.parametrize("prompt_format", ["gsm8k", "triviaqa"])
def test_generate_prompt_format_wraps_the_prompt_as_training_did(soft_model, capsys, monkeypatch, prompt_format):
    """The model sees exactly the prompt a training row of that format had (the converter's, `soft_peft.data`)."""
    from datasets import Dataset

    from soft_peft.data import to_trl_format

    seen = []

    def recording(args, model, input_ids, vocab_subset):
        seen.append(tiny_tokenizer().decode(input_ids[0]))
        return input_ids, {}

    monkeypatch.setattr(soft_peft.cli.generate, "_decode", recording)
    argv = ["generate", "--model_name_or_path", soft_model, "--prompt", "2+2?", "--max_new_tokens", "3"]
    assert soft_peft_main([*argv, "--prompt_format", prompt_format]) == 0
    row = Dataset.from_list([{"question": "2+2?", "answer": "4"}])
    assert seen == [to_trl_format(row, prompt_format)[0][0]["prompt"]] == ["Question: 2+2?\nAnswer:"]


def test_generate_checks_the_formatted_prompt_against_the_context(soft_model, capsys, no_loading):
    """The Alpaca template is ~150 characters: the tiny model's 64-token context is checked on the wrapped prompt."""
    argv = ["generate", "--model_name_or_path", soft_model, "--prompt", "hi", "--max_new_tokens", "3"]
    line = usage_error(capsys, [*argv, "--prompt_format", "alpaca"])
    assert "the prompt is 1" in line and f"context is {CONTEXT} tokens" in line
    assert "argument --chat: not allowed with argument --prompt_format" in usage_error(
        capsys, [*argv, "--prompt_format", "gsm8k", "--chat"]
    )


@pytest.mark.parametrize(
    "flags, warning",
    [
        (["--draft_exit", "1"], "--draft_exit 1 is not one of the exits"),
        (["--num_layers", "3"], "--num_layers 3 is not one of the exits"),
        (["--thresholds", "0.5", "--exits", "1,2"], "--thresholds at exits 1 is not one of the exits"),
        (["--draft_exit", "2"], None),
        (["--num_layers", "4"], None),
    ],
)
def test_generate_warns_for_an_untrained_exit(soft_model, capsys, flags, warning):
    argv = ["generate", "--model_name_or_path", soft_model, "--prompt", "hi", "--max_new_tokens", "3", *flags]
    assert soft_peft_main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0] and "was trained with ([2, 4])" in warnings[0]


@pytest.mark.parametrize("flags", [["--draft_exit", "2"], ["--thresholds", "0.5"], ["--num_layers", "2"]])
def test_generate_warns_on_a_model_without_trained_exits(plain_model, capsys, flags):
    argv = ["generate", "--model_name_or_path", plain_model, "--prompt", "hi", "--max_new_tokens", "3", *flags]
    assert soft_peft_main(argv) == 0
    err = capsys.readouterr().err
    assert "soft-peft generate: warning: " in err and "records no trained exits (no `soft_exit_layers`" in err


@pytest.mark.parametrize("num_layers, message", [("0", "--num_layers 0: must be in 1..4"), ("5", "must be in 1..4")])
def test_extract_bad_depth_fails_before_loading(soft_model, tmp_path, capsys, no_loading, num_layers, message):
    argv = ["extract", "--model_name_or_path", soft_model, "--num_layers", num_layers, "--output_dir", str(tmp_path)]
    assert message in usage_error(capsys, argv, prog="soft-peft extract")


def test_extract_warns_like_generate(plain_model, tmp_path, capsys):
    argv = ["extract", "--model_name_or_path", plain_model, "--num_layers", "2", "--output_dir", str(tmp_path / "s")]
    assert soft_peft_main(argv) == 0
    err = capsys.readouterr().err
    assert "soft-peft extract: warning: " in err and "records no trained exits" in err
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    "model, flags, message",
    [
        ("soft", ["--exits", "0"], "exits has [0], but layers are counted from 1"),
        ("soft", ["--exits", "5"], "exits has [5] outside 1..4"),
        ("plain", [], "records no SoFT exits"),
        ("plain", [], "or an explicit list such as --exits 2,4."),
    ],
)
def test_eval_bad_exits_fail_before_loading(
    soft_model, plain_model, tmp_path, capsys, no_loading, model, flags, message
):
    name = soft_model if model == "soft" else plain_model
    argv = ["eval", "--model_name_or_path", name, "--dataset_name", "x.jsonl", "--output_dir", str(tmp_path), *flags]
    assert soft_peft_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", [["2,4"], []])
def test_eval_names_its_flag_when_given_trainings_exit_layers(soft_model, tmp_path, capsys, no_loading, value):
    argv = ["eval", "--model_name_or_path", soft_model, "--dataset_name", "x.jsonl", "--output_dir", str(tmp_path)]
    line = usage_error(capsys, [*argv, "--exit_layers", *value], prog="soft-peft eval")
    assert line.endswith("the exits to evaluate are --exits, such as --exits 9,15,30.")


def test_eval_non_positive_counts_are_usage_errors(soft_model, tmp_path, capsys):
    argv = ["eval", "--model_name_or_path", soft_model, "--dataset_name", "x.jsonl", "--output_dir", str(tmp_path)]
    line = usage_error(capsys, [*argv, "--batch_size", "0"], prog="soft-peft eval")
    assert "argument --batch_size: must be >= 1, got 0" in line


@pytest.mark.parametrize("command", ["generate", "extract"])
def test_help_of_the_decoding_commands_loads_neither_torch_nor_transformers(command):
    # The pre-load checks they import (soft_peft.cli.preflight) keep torch and transformers inside the checks
    code = (
        "import contextlib, io, sys\nfrom soft_peft.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main(['{command}', '--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stderr
