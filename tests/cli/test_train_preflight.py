"""The training script's checks before any weight loads or any row is tokenized: exits against the real depth, the
output folder, and the checkpoint to resume. Each bad input must end in one line and exit code 2 without loading."""

from __future__ import annotations

import json
import os

import pytest
from example_runs import TINY_TRAIN_ARGS, step_logs
from train_cli_helpers import Loaded, refuse_loading, train_argv, train_error

from soft_peft.cli.preflight import UsageError, check_output_dir
from soft_peft.cli.train import main as train_main
from soft_peft.resume import resolve_resume_checkpoint


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--exit_layers", "5"], "exit_layers has [5] outside 1..4. The model has 4 decoder layers"),
        (["--exit_layers", "2:"], None),  # an open slice is fine: its end is the depth
        (["--exit_loss_weights", "1,2"], "exit_loss_weights has 2 values but there are 4 exits [1, 2, 3, 4]"),
    ],
)
def test_exits_are_checked_against_the_config_depth_before_loading(
    capsys, tmp_path, tiny_model_dir, alpaca_file, flags, expected, monkeypatch
):
    refuse_loading(monkeypatch)
    argv = train_argv(tiny_model_dir, alpaca_file, tmp_path / "out") + flags
    if expected is None:
        with pytest.raises(Loaded):
            train_main(argv)
        return
    assert expected in train_error(capsys, argv)


def test_exit_zero_is_refused_when_parsed_saying_layers_count_from_1(capsys, tmp_path, alpaca_file):
    # Refused by the settings' own validation, before the model (here the unreachable Hub default) is looked at
    line = train_error(capsys, ["--dataset_name", str(alpaca_file), "--exit_layers", "0"])
    assert "exit_layers has [0], but layers are counted from 1" in line, line
    assert "from 1 to the model's depth" in line, line


def test_unwritable_output_dir(capsys, tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    refuse_loading(monkeypatch)
    # The tests run as root, which may write anywhere: deny the folder through `os.access` instead of chmod
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    line = train_error(capsys, train_argv(tiny_model_dir, alpaca_file, locked / "run"))
    assert f"its parent {locked} is not writable" in line and "choose another --output_dir" in line


def test_output_dir_under_a_file(capsys, tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    refuse_loading(monkeypatch)
    line = train_error(capsys, train_argv(tiny_model_dir, alpaca_file, alpaca_file / "run"))
    assert "is a file, not a folder" in line


@pytest.mark.parametrize("leftover", ["model.safetensors", "trainer_state.json", "checkpoint-3"])
def test_a_previous_run_is_refused_unless_overwritten(
    capsys, tmp_path, tiny_model_dir, alpaca_file, leftover, monkeypatch
):
    refuse_loading(monkeypatch)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    if leftover.startswith("checkpoint"):
        (output_dir / leftover).mkdir()
    else:
        (output_dir / leftover).write_text("{}")
    line = train_error(capsys, train_argv(tiny_model_dir, alpaca_file, output_dir))
    assert f"already holds a run ({leftover})" in line and "--overwrite_output_dir" in line
    with pytest.raises(Loaded):  # the flag lets it through to loading
        train_main(train_argv(tiny_model_dir, alpaca_file, output_dir) + ["--overwrite_output_dir"])


def make_checkpoint(output_dir, step: int, complete: bool):
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.mark.parametrize("value", [True, "true", "True"])
def test_resume_picks_the_latest_complete_checkpoint(tmp_path, capsys, value):
    make_checkpoint(tmp_path, 2, complete=True)
    make_checkpoint(tmp_path, 10, complete=True)
    make_checkpoint(tmp_path, 12, complete=False)  # killed while saving; 12 > 10 tests the numeric order
    assert resolve_resume_checkpoint(value, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    printed = capsys.readouterr().out
    assert "checkpoint-12 is incomplete (no trainer_state.json); resuming from checkpoint-10" in printed


def test_resume_from_an_incomplete_checkpoint_names_the_complete_one(tmp_path):
    make_checkpoint(tmp_path, 2, complete=True)
    broken = make_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(ValueError, match=r"checkpoint-4 is incomplete .*resume from .*checkpoint-2, the latest"):
        resolve_resume_checkpoint(str(broken), str(tmp_path))


def test_resume_without_a_complete_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 4, complete=False)
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None  # not resuming: nothing is looked at
    with pytest.raises(ValueError, match="nothing to resume in .*checkpoint-4 is incomplete"):
        resolve_resume_checkpoint("true", str(tmp_path))
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))


def test_check_output_dir_accepts_a_fresh_or_resumed_folder(tmp_path):
    check_output_dir(str(tmp_path / "new" / "run"))
    make_checkpoint(tmp_path, 2, complete=True)
    check_output_dir(str(tmp_path), resuming=True)
    with pytest.raises(UsageError, match=r"already holds a run \(checkpoint-2\)"):
        check_output_dir(str(tmp_path))


def test_resume_flag_alone_skips_a_checkpoint_cut_off_while_saving(tmp_path, tiny_model_dir, alpaca_file, capsys):
    output_dir = tmp_path / "run"
    argv = train_argv(tiny_model_dir, alpaca_file, output_dir) + TINY_TRAIN_ARGS
    assert train_main([*argv, "--save_strategy", "steps", "--save_steps", "1"]) == 0
    # A kill during the second save leaves the model but not the trainer state, which is written last
    os.remove(output_dir / "checkpoint-2" / "trainer_state.json")
    assert train_main([*argv, "--max_steps", "3", "--resume_from_checkpoint", "--save_strategy", "no"]) == 0
    assert "checkpoint-2 is incomplete (no trainer_state.json); resuming from checkpoint-1" in capsys.readouterr().out
    # Resumed after step 1: steps 2 and 3 are trained again and logged after the restored step 1
    assert sorted(step_logs(output_dir)) == [1, 2, 3]
