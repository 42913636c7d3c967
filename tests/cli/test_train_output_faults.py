"""`soft-peft train` and its output folder (issue 35, items 8 and 9): never over the model it reads, and a disk that
fills at a checkpoint or at the final save, or a folder that refuses writes, ends in one line naming the folder and the
fix, with no partial final save left to block the next run."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
from example_runs import TINY_TRAIN_ARGS
from safetensors import SafetensorError
from train_cli_helpers import Loaded, alpaca_data, refuse_loading, refusing_writes_in, train_argv, train_error

from soft_peft.cli.preflight import check_output_dir, finished_run_files
from soft_peft.cli.train import main as train_main


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the digest of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["the model folder", "a folder that contains it"])
def test_train_refuses_to_write_over_the_model_it_reads(capsys, tmp_path, tiny_model_dir, monkeypatch, where):
    """Before, `--overwrite_output_dir` let the final save replace the base model's files in place."""
    refuse_loading(monkeypatch)
    model = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dir, model)
    output = model if where == "the model folder" else model.parent
    before = snapshot(model.parent)
    data = alpaca_data(tmp_path)
    line = train_error(capsys, train_argv(model, data, output, "--overwrite_output_dir", "true"))
    what = "is" if output == model else "contains"
    assert line.endswith(
        f"--output_dir {output} {what} the model being read ({model}): writing there would destroy it "
        "(even with --overwrite_output_dir). Choose another --output_dir."
    ), line
    assert snapshot(model.parent) == before


def test_an_output_folder_that_refuses_writes_is_refused_before_loading(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """Permission bits do not stop root (the tests' user), and a network mount may refuse a write they allow: the
    folder's writes are made to fail (as they would there) where the check creates its probe file."""
    refuse_loading(monkeypatch)
    closed = tmp_path / "closed"
    closed.mkdir()
    with refusing_writes_in(closed):
        line = train_error(capsys, train_argv(tiny_model_dir, alpaca_data(tmp_path), closed))
    assert line.endswith(
        f"--output_dir {closed}: it is not writable (permission denied), so nothing could be saved; choose another "
        "--output_dir or fix its permissions."
    ), line
    assert os.listdir(closed) == []


FULL_DISK = {
    "OSError": OSError(errno.ENOSPC, "No space left on device"),
    # What safetensors' Rust writer raises on a full disk: no errno, only its text
    "SafetensorError": SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    ),
}


@pytest.mark.parametrize("error", FULL_DISK)
def test_a_full_disk_at_the_final_save_says_so_and_leaves_nothing_that_blocks_the_next_run(
    capsys, tmp_path, tiny_model_dir, error
):
    """Before: a traceback, and the `config.json` written before the weights made the next run refuse the folder."""
    output = tmp_path / "out"
    argv = train_argv(tiny_model_dir, alpaca_data(tmp_path), output, *TINY_TRAIN_ARGS)
    with mock.patch("transformers.modeling_utils.safe_save_file", side_effect=FULL_DISK[error]):
        line = train_error(capsys, argv)
    assert line.endswith(
        f"--output_dir {output}: no space left on device while saving the final model (its files removed). Free "
        "space on its disk or choose another --output_dir, then run again."
    ), line
    assert finished_run_files(str(output)) == []
    check_output_dir(str(output))  # the next run, without --overwrite_output_dir, is not refused


def test_a_full_disk_at_a_checkpoint_says_so_and_names_the_checkpoint_to_resume(
    capsys, tmp_path, tiny_model_dir, monkeypatch
):
    output = tmp_path / "out"
    argv = train_argv(tiny_model_dir, alpaca_data(tmp_path), output, *TINY_TRAIN_ARGS)
    argv += ["--save_strategy", "steps", "--save_steps", "1"]
    saves = []

    def save_until_full(*args, **kwargs):
        saves.append(args[1])
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    from transformers import modeling_utils

    real_save = modeling_utils.safe_save_file
    with mock.patch.object(modeling_utils, "safe_save_file", save_until_full):
        line = train_error(capsys, argv)
    assert line.endswith(
        f"--output_dir {output}: no space left on device at step 2. Free space on its disk or choose another "
        f"--output_dir, then resume with --resume_from_checkpoint {output / 'checkpoint-1'}."
    ), line
    assert "checkpoint-2" in saves[1]  # it failed saving the second checkpoint
    refuse_loading(monkeypatch)
    with pytest.raises(Loaded):  # and the resume line it gives passes every check
        train_main(argv + ["--resume_from_checkpoint", str(output / "checkpoint-1")])
