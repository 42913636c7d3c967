"""Every bad input of the second sweep (issue 24, parts 3 and 4), as a user gives it to `soft-peft train`,
`soft-peft generate`, `soft-peft eval` or the Python API.

Each case asserts the one-line message, the exit status, that no model was loaded (a patched, counting
`from_pretrained`: the check came first) and that nothing on disk changed. The weight cases that do train check
what was trained, logged and recorded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from example_runs import (
    CPU_LAUNCH,
    TINY_TRAIN_ARGS,
    free_port,
    run,
    step_logs,
    write_jsonl,
)
from transformers import PreTrainedModel, T5Config, T5ForConditionalGeneration

from soft_peft import SoFTTrainer, SortedLossWrapper
from soft_peft.cli.eval import main as eval_main
from soft_peft.cli.generate import main as generate_main
from soft_peft.cli.preflight import read_model_facts, untrained_exit_warning
from soft_peft.cli.train import main as train_main

TRAIN_ERROR = "soft-peft train: error: "


@pytest.fixture
def loads(monkeypatch):
    """Count `from_pretrained` calls of any model class; each one fails, as the checks must all come first."""
    calls = []

    def counting(cls, *args, **kwargs):
        calls.append(cls.__name__)
        raise AssertionError(f"{cls.__name__}.from_pretrained was called before the input was refused")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    return calls


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under `folders` with the digest of its bytes."""
    files = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def refused(capsys, main, argv: list[str], prefix: str, loads: list, *kept: Path) -> str:
    """Run `main(argv)`; assert exit status 2, one error line and no traceback, no model loaded, `kept` unchanged.

    Returns:
        The error line, without its prefix.
    """
    before = snapshot(*kept)
    try:
        status = main(argv)
    except SystemExit as exited:  # argparse-based commands exit through `parser.error`
        status = exited.code
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert status == 2, stderr
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert loads == [], f"a model was loaded before the refusal: {loads}"
    assert snapshot(*kept) == before, "a file changed"
    return errors[0][len(prefix) :]


def train_argv(model_dir, data, output_dir, *flags) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir)] + [
        *TINY_TRAIN_ARGS,
        *flags,
    ]


@pytest.fixture
def output_dir(tmp_path):
    """An output folder that already holds a user's file, which no refusal may touch."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


# --- 3. Weights mean what the user wrote ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--exit_loss_weights", "inf,1"], "has a negative, NaN or infinite weight"),
        (["--exit_loss_weights", "nan,1"], "has a negative, NaN or infinite weight"),
        (["--exit_loss_weights", "1e308,1e308"], "sums to inf, which overflows"),
        (["--exit_loss_weights", "last:0"], "gives the deepest exit (with the default exits, the full model)"),
        (["--exit_loss_weights", "0,0"], "at least one weight must be positive"),
    ],
)
def test_weights_that_would_train_nothing_are_refused(
    capsys, tiny_model_dir, alpaca_file, output_dir, loads, flags, expected
):
    argv = train_argv(tiny_model_dir, alpaca_file, output_dir, *flags)
    assert expected in refused(capsys, train_main, argv, TRAIN_ERROR, loads, output_dir, tiny_model_dir)


def saved_exits(folder: Path) -> list[int]:
    return json.loads((folder / "config.json").read_text())["soft_exit_layers"]


def test_explicit_weights_follow_the_written_exit_order_and_are_logged(capsys, tmp_path, tiny_model_dir, alpaca_file):
    # The sweep's case: exits "30,9" with weights "1,0" trained exit 9 alone; here "4,2" with "1,0" on 4 layers
    output = tmp_path / "run"
    argv = train_argv(tiny_model_dir, alpaca_file, output, "--exit_layers", "4,2", "--exit_loss_weights", "1,0")
    assert train_main(argv + ["--max_steps", "1"]) == 0
    assert "[soft-peft] exit loss weights (1,0): 2: 0, 4: 1" in capsys.readouterr().out
    first = step_logs(output)[1]
    assert (first["exit_2/weight"], first["exit_4/weight"]) == (0.0, 1.0)  # reported to every `report_to` backend
    assert saved_exits(output) == [4]  # exit 2 had weight 0: not recorded as trained


def test_last_1_is_plain_sft_and_records_only_the_last_layer(tmp_path, tiny_model_dir, alpaca_file, capsys):
    output = tmp_path / "run"
    argv = train_argv(tiny_model_dir, alpaca_file, output, "--exit_layers", "1:", "--exit_loss_weights", "last:1")
    assert train_main(argv + ["--max_steps", "1"]) == 0
    assert saved_exits(output) == [4]
    # So decoding from another exit of this model warns, as for any untrained exit
    warning = untrained_exit_warning(read_model_facts(str(output)), [2], "--exit_layer")
    assert warning is not None and "not one of the exits" in warning and "[4]" in warning


def test_a_zero_weight_on_the_deepest_exit_is_followed_with_a_warning(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.warns(UserWarning, match="deepest exit, layer 4, weight 0: it is not trained"):
        wrapper = SortedLossWrapper(model, exit_layers=[4, 2], exit_loss_weights=[0, 1])
    assert wrapper.config.soft_exit_layers == [2]


# --- 4. Every input error before the model loads -------------------------------------------------------------------


def rows_file(tmp_path, rows) -> Path:
    return write_jsonl(tmp_path / "rows.jsonl", rows)


# Completions that are not JSON literals: `datasets` stores a column mixing strings and numbers as JSON text, and
# decodes a string such as " 4" back as the number 4
PAIR = {"prompt": "2 + 2 =", "completion": " four"}
CHAT = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}


@pytest.mark.parametrize(
    "rows, dataset_format, expected",
    [
        ([PAIR, CHAT, PAIR], "auto", "rows mix formats: row 1 has 'prompt'/'completion', row 2 has 'messages'"),
        ([CHAT, PAIR], "messages", "rows mix formats: row 1 has 'messages', row 2 has 'prompt'/'completion'"),
        ([PAIR, {"prompt": "1 + 1 =", "completion": 2}], "auto", "row 2: 'completion' is 2 (of type int)"),
        ([PAIR, PAIR, {"prompt": "x", "completion": None}], "auto", "row 3: 'completion' is null"),
        ([{"prompt": None, "completion": " 1"}, PAIR], "prompt_completion", "row 1: 'prompt' is null"),
        ([{"prompt": 7, "completion": " 1"}], "auto", "row 1: 'prompt' is 7 (of type int)"),
        ([{"text": "a"}, {"text": None}], "text", "row 2: 'text' is null"),
        (
            [{"instruction": "Add.", "output": None}],
            "alpaca",
            "row 1: 'output' is null, but alpaca rows need a string",
        ),
        ([{"question": "q", "answer": 3}], "gsm8k", "row 1: 'answer' is 3 (of type int)"),
    ],
)
def test_malformed_rows_are_refused_naming_file_and_row(
    capsys, tmp_path, tiny_model_dir, output_dir, loads, rows, dataset_format, expected
):
    data = rows_file(tmp_path, rows)
    argv = train_argv(tiny_model_dir, data, output_dir, "--dataset_format", dataset_format)
    line = refused(capsys, train_main, argv, TRAIN_ERROR, loads, output_dir, data)
    assert line.startswith(str(data)) and expected in line, line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--per_device_train_batch_size", "0"],
            "per_device_train_batch_size=0 is out of range: it must be an integer",
        ),
        (["--learning_rate", "-1"], "learning_rate=-1.0 is out of range: it must be a finite number >= 0"),
        (["--max_steps", "-5"], "max_steps=-5 is out of range"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs=0.0 is out of range"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0 is out of range"),
        (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size=0"),
        (["--weight_decay", "-0.1"], "weight_decay=-0.1"),
        (["--adam_beta1", "1"], "adam_beta1=1.0"),
        (["--adam_epsilon", "-1"], "adam_epsilon=-1.0"),
        (["--dataloader_num_workers", "-1"], "dataloader_num_workers=-1"),
        (["--max_length", "0"], "max_length=0"),
        (["--save_strategy", "steps", "--save_steps", "0"], "save_steps=0"),
        (["--exit_anneal_fraction", "1"], "exit_anneal_fraction must be a number in [0, 1)"),
        (["--exit_anneal_fraction", "nan"], "exit_anneal_fraction must be a number in [0, 1)"),
        (["--exit_anneal_fraction", "0.5", "--exit_anneal_floor", "inf"], "exit_anneal_floor must be a number in"),
        (["--exit_anneal_floor", "0.2"], "set exit_anneal_fraction above 0"),
    ],
)
def test_training_numbers_out_of_range_are_refused(
    capsys, tiny_model_dir, alpaca_file, output_dir, loads, flags, expected
):
    argv = train_argv(tiny_model_dir, alpaca_file, output_dir, *flags)
    assert expected in refused(capsys, train_main, argv, TRAIN_ERROR, loads, output_dir)


def test_the_python_api_refuses_them_before_loading_too(tmp_path, loads):
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, learning_rate=-1.0)
    with pytest.raises(ValueError, match="learning_rate=-1.0 is out of range"):
        SoFTTrainer("some/model", args=args)
    assert loads == []


def copy_model(source: Path, target: Path, skip=()) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            shutil.copy(path, target / path.name)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda folder: truncate(folder / "model.safetensors"), "the weights file is truncated ("),
        (lambda folder: truncate(folder / "model.safetensors", keep=0.0), "no safetensors header"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b"\x10" * 64), "truncated or not safetensors"),
    ],
)
def test_a_truncated_weights_file_is_named(capsys, tmp_path, tiny_model_dir, alpaca_file, loads, damage, expected):
    broken = copy_model(tiny_model_dir, tmp_path / "broken")
    damage(broken)
    output = tmp_path / "out"
    line = refused(capsys, train_main, train_argv(broken, alpaca_file, output), TRAIN_ERROR, loads, broken)
    assert f"{broken / 'model.safetensors'}: " in line and expected in line and "re-download or re-save" in line
    assert not output.exists()


def test_a_shard_missing_from_the_index_is_named(capsys, tmp_path, tiny_model_dir, alpaca_file, loads):
    sharded = copy_model(tiny_model_dir, tmp_path / "sharded", skip=("model.safetensors",))
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refused(capsys, train_main, train_argv(sharded, alpaca_file, tmp_path / "o"), TRAIN_ERROR, loads, sharded)
    assert "lists model-00002-of-00002.safetensors, which" in line and "lacks" in line


def test_a_model_folder_without_a_tokenizer_says_how_to_pass_one(capsys, tmp_path, tiny_model_dir, alpaca_file, loads):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):  # what `model.save_pretrained` alone writes
        shutil.copy(tiny_model_dir / name, bare / name)
    line = refused(capsys, train_main, train_argv(bare, alpaca_file, tmp_path / "o"), TRAIN_ERROR, loads, bare)
    assert f"{bare} has no tokenizer" in line and "--tokenizer_name_or_path" in line and "sentencepiece" not in line
    # With the flag the checks pass: the next thing is loading the model
    with pytest.raises(AssertionError, match="from_pretrained was called"):
        train_main(train_argv(bare, alpaca_file, tmp_path / "o", "--tokenizer_name_or_path", str(tiny_model_dir)))
    assert len(loads) == 1


def test_generate_and_eval_check_the_folder_too(capsys, tmp_path, tiny_model_dir, loads):
    bare = copy_model(tiny_model_dir, tmp_path / "bare", skip=("tokenizer.json", "tokenizer_config.json"))
    line = refused(
        capsys, generate_main, ["--model_name_or_path", str(bare), "--prompt", "hi"], "soft-peft generate: ", loads
    )
    assert f"{bare} has no tokenizer" in line and "--tokenizer_name_or_path" in line
    broken = copy_model(tiny_model_dir, tmp_path / "broken")
    truncate(broken / "model.safetensors")
    argv = ["--model_name_or_path", str(broken), "--dataset_name", "unused.jsonl", "--output_dir", str(tmp_path / "e")]
    line = refused(capsys, eval_main, argv, "soft-peft eval: error: ", loads, broken)
    assert f"{broken / 'model.safetensors'}: the weights file is truncated" in line


def tiny_t5_config() -> T5Config:
    return T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=64, decoder_start_token_id=0)


def test_an_encoder_decoder_model_is_refused_by_the_cli(capsys, tmp_path, alpaca_file, loads):
    folder = tmp_path / "t5"
    tiny_t5_config().save_pretrained(folder)
    line = refused(capsys, train_main, train_argv(folder, alpaca_file, tmp_path / "o"), TRAIN_ERROR, loads, folder)
    assert "a T5Config is an encoder-decoder model; SoFT needs a decoder-only causal LM" in line


def test_an_encoder_decoder_model_is_refused_at_wrap_time():
    model = T5ForConditionalGeneration(tiny_t5_config())
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model .* decoder-only"):
        SortedLossWrapper(model)


# --- Under accelerate launch: one line, no launcher traceback ------------------------------------------------------


def test_a_launched_error_is_printed_once_without_a_traceback(tmp_path, alpaca_file):
    launch = ["accelerate", "launch", "--quiet", *CPU_LAUNCH, "--cpu", "--main_process_port", str(free_port())]
    argv = ["-m", "soft_peft.cli.train", "--dataset_name", str(alpaca_file), "--exit_layers", "0"]
    result = run([*launch, *argv, "--output_dir", str(tmp_path / "o")], timeout=300, check=False)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0
    assert len(errors) == 1 and "layers are counted from 1" in errors[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
