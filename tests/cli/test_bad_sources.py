"""Bad data files and model sources (issue 35), as a user gives them to `soft-peft train`, `eval`, `generate` and
`extract`: one line, exit status 2, no traceback, no model loaded and no file changed (see `test_bad_input.refused`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import test_bad_input
from peft import LoraConfig, get_peft_model
from test_bad_input import TRAIN_ERROR, copy_model, refused, train_argv
from tiny_models import tiny_model

from soft_peft.cli import main as soft_peft_main
from soft_peft.cli.train import main as train_main

# Its fixtures, taken by name: no model loaded before the refusal, and an output folder holding a user's file
loads, output_dir = test_bad_input.loads, test_bad_input.output_dir
CHAT = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("rows.csv", b"prompt,completion\n", "the dataset has no rows: the CSV has only its header line."),
        ("rows.json", b"[]\n", "the dataset has no rows: the JSON list is empty."),
        ("rows.jsonl", b"{}\n{}\n", "the dataset has no rows: each of its 2 rows is an empty object {}."),
        ("rows.json", b"[{}]", "the dataset has no rows: its one row is {}."),
        (
            "rows.jsonl",
            b'{"prompt": "a", "completion": " b"}\n{"prompt": "caf\xe9", "completion": " c"}\n',
            ", line 2: not UTF-8 text (byte 0xe9 at byte 16 of the line). Save the file as UTF-8",
        ),
        ("rows.csv", b"prompt,completion\ncaf\xe9,x\n", ", line 2: not UTF-8 text (byte 0xe9"),
        (
            "rows.jsonl",
            (json.dumps(CHAT) + "\n" + json.dumps({"messages": []}) + "\n").encode(),
            ", row 2: 'messages' is an empty list: a conversation needs at least one message.",
        ),
    ],
)
def test_data_files_without_usable_rows_are_refused_in_one_line(
    capsys, tmp_path, tiny_model_dir, output_dir, loads, name, content, expected
):
    data = tmp_path / name
    data.write_bytes(content)
    line = refused(
        capsys, train_main, train_argv(tiny_model_dir, data, output_dir), TRAIN_ERROR, loads, output_dir, data
    )
    assert line.startswith(str(data)) and expected in line, line


def test_messages_without_a_role_are_named_not_blamed_on_max_length(
    capsys, tmp_path, tiny_model_dir, output_dir, loads
):
    # Before: "every one of the 2 train rows is longer than --max_length ...", after the model had loaded
    no_role = {"messages": [{"content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(CHAT) + "\n" + json.dumps(no_role) + "\n")
    line = refused(
        capsys, train_main, train_argv(tiny_model_dir, data, output_dir), TRAIN_ERROR, loads, output_dir, data
    )
    assert f"{data}, row 2: 'messages' has message 1 without a 'role' (it has ['content'])" in line, line
    assert "max_length" not in line


COMMANDS = {
    "generate": ["--prompt", "hi"],
    "eval": ["--dataset_name", "unused.jsonl", "--output_dir", "{tmp}/e"],
    "extract": ["--num_layers", "2", "--output_dir", "{tmp}/x"],
}


def command_argv(command: str, model, tmp_path) -> list[str]:
    return [command, "--model_name_or_path", str(model), *(a.format(tmp=tmp_path) for a in COMMANDS[command])]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_adapter_whose_base_folder_is_gone_names_it(capsys, tmp_path, command, loads):
    adapter, gone = tmp_path / "adapter", tmp_path / "base"
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = str(gone)  # trained on a folder since deleted
    peft_model.save_pretrained(adapter)
    line = refused(capsys, soft_peft_main, command_argv(command, adapter, tmp_path), f"soft-peft {command}: ", loads)
    assert f"--model_name_or_path {adapter} is a PEFT adapter whose base model cannot be found: {gone}: " in line
    assert "base_model_name_or_path" in line and "Repo id" not in line, line


@pytest.fixture
def remote_code_model(tmp_path, tiny_model_dir):
    """A model folder whose config only its own code reads; that code, if ever run, leaves a file behind."""
    folder = copy_model(tiny_model_dir, tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_secret", auto_map={"AutoConfig": "modeling_x.XConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_x.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    return folder


REMOTE = "its config.json asks to run the model's own code (auto_map modeling_x.XConfig; model_type 'tiny_secret' is"


@pytest.mark.parametrize("command", [*sorted(COMMANDS), "train", "train --trust_remote_code true"])
def test_a_model_that_needs_remote_code_is_refused(capsys, tmp_path, alpaca_file, remote_code_model, loads, command):
    command, *flags = command.split()
    argv = (
        ["train", *train_argv(remote_code_model, alpaca_file, tmp_path / "o", *flags)]
        if command == "train"
        else command_argv(command, remote_code_model, tmp_path)
    )
    line = refused(capsys, soft_peft_main, argv, f"soft-peft {command}: ", loads, remote_code_model)
    assert REMOTE in line and "soft-peft does not run remote code" in line, line
    assert not (tmp_path / "ran").exists()


def test_remote_code_is_refused_without_a_prompt_when_stdin_is_closed(tmp_path, alpaca_file, remote_code_model):
    # transformers asked "Do you wish to run the custom code? [y/N]" here (soft-peft eval)
    argv = command_argv("eval", remote_code_model, tmp_path)
    argv[argv.index("unused.jsonl")] = str(alpaca_file)
    result = subprocess.run(
        [sys.executable, "-m", "soft_peft.cli", *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "[y/N]" not in output and "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("soft-peft eval: error: ")]
    assert len(errors) == 1 and REMOTE in errors[0], result.stderr
    assert not (tmp_path / "ran").exists()
