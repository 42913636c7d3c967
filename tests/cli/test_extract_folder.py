"""`soft-peft extract` loses no export and deletes no folder it should not (issue 35, items 5-7 and 9): one export at
a time per folder, a swap that leaves one complete export at every instant (also when killed), `--overwrite_output_dir`
only over a saved model, and a disk that fills or refuses writes reported in one line with nothing changed."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from train_cli_helpers import refusing_writes_in
from transformers import AutoModelForCausalLM, PreTrainedModel

from soft_peft.cli import main as soft_peft_main

ERROR = "soft-peft extract: error: "


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with the digest of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def extract(*argv: str) -> tuple[int, list[str], str]:
    """Run `soft-peft extract argv` in this process; returns its exit status, its error lines and all of stderr."""
    with mock.patch("sys.stderr", new_callable=io.StringIO) as stderr:
        try:
            status = soft_peft_main(["extract", *argv])
        except SystemExit as exited:
            status = exited.code
    text = stderr.getvalue()
    return status, [line for line in text.splitlines() if line.startswith(ERROR)], text


def depth(folder: Path) -> int:
    """The decoder depth of the export in ``folder``, after checking that it is complete (it reloads)."""
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(folder)), folder
    return AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers


@pytest.fixture
def old_export(tiny_model_dir, tmp_path) -> Path:
    """A folder holding an earlier export: a complete 4-layer model with its tokenizer and card."""
    folder = tmp_path / "exports" / "out"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("the earlier export's card")
    return folder


def test_a_second_export_into_the_folder_of_a_running_one_is_refused_and_the_first_kept(tiny_model_dir, tmp_path):
    """Two exports into one new folder: before, both said "Saved" and the first to finish was deleted by the other's
    swap. The second starts while the first is saving (run from inside its save, in this process)."""
    output = tmp_path / "new"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output)]
    second = []
    real_save = PreTrainedModel.save_pretrained

    def save_starting_a_second_export(model, *args, **kwargs):
        if not second:
            second.append(None)
            second[0] = extract(*argv, "--num_layers", "3")
        return real_save(model, *args, **kwargs)

    with mock.patch.object(PreTrainedModel, "save_pretrained", save_starting_a_second_export):
        first_status, first_errors, _ = extract(*argv, "--num_layers", "2")
    status, errors, stderr = second[0]
    assert first_status == 0 and not first_errors
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert f"--output_dir {output} is in use by another run (PID {os.getpid()} on host " in errors[0]
    assert depth(output) == 2  # the first export, whole
    assert sorted(os.listdir(tmp_path)) == ["new"]  # no lock, staging or replaced folder left


# A run of extract killed (SIGKILL, no clean-up) at one point of its swap
KILLED_AT = """
import os, shutil, signal, sys
from soft_peft.cli import main
point = sys.argv[1]
real_rename, real_rmtree = os.rename, shutil.rmtree
name = os.path.basename
def rename(src, dst, *args, **kwargs):
    if (point == "before_swap" and name(dst).startswith(".out.replaced-")) or (
        point == "between_renames" and name(src).startswith(".out.partial-")
    ):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst, *args, **kwargs)
def rmtree(path, *args, **kwargs):
    if point == "before_delete" and name(path).startswith(".out.replaced-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)
os.rename, shutil.rmtree = rename, rmtree
sys.exit(main(["extract", *sys.argv[2:]]))
"""


@pytest.mark.parametrize(
    "point, left, kept_depth, recovered",
    [
        # killed with the new export written, before the old one moved: the unfinished folder is removed
        ("before_swap", {"out", ".out.partial-"}, 4, "the unfinished folder of an interrupted export"),
        # killed between the renames: the old export, aside, is the only complete one and is put back
        ("between_renames", {".out.replaced-", ".out.partial-"}, 4, "restored the previous export to"),
        # killed after the new export moved in: the old one, aside, is removed
        ("before_delete", {"out", ".out.replaced-"}, 2, "the previous export that an interrupted export had replaced"),
    ],
)
def test_a_kill_during_the_swap_leaves_a_complete_export_which_the_next_run_restores(
    tiny_model_dir, old_export, point, left, kept_depth, recovered
):
    """Before, the old export was deleted before the new one was renamed in: a kill between left no export."""
    argv = ["--model_name_or_path", str(tiny_model_dir), "--num_layers", "2", "--output_dir", str(old_export)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, point, *argv, "--overwrite_output_dir"], check=False)
    assert killed.returncode == -signal.SIGKILL
    parent = old_export.parent
    entries = [name for name in os.listdir(parent) if not name.endswith(".soft-peft.lock")]
    assert {name.split("-")[0] + "-" if "-" in name else name for name in entries} == left, entries
    complete = [parent / name for name in entries if (parent / name / "README.md").is_file()]
    assert any((folder / "config.json").is_file() for folder in complete)  # a complete export exists
    # The next export into the folder (refused here, as it is not empty) first puts things right, saying so
    status, errors, stderr = extract(*argv)
    assert status == 2 and len(errors) == 1 and "is not empty" in errors[0]
    assert recovered in stderr and "Traceback" not in stderr
    assert sorted(os.listdir(parent)) == ["out"]
    assert depth(old_export) == kept_depth


def test_a_swap_that_fails_puts_the_old_export_back(tiny_model_dir, old_export):
    before = snapshot(old_export.parent)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--num_layers", "2", "--output_dir", str(old_export)]
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.path.basename(src).startswith(".out.partial-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_rename(src, dst, *args, **kwargs)

    with mock.patch("os.rename", rename):
        status, errors, stderr = extract(*argv, "--overwrite_output_dir")
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "the export could not be written (permission denied); nothing was changed there" in errors[0]
    assert snapshot(old_export.parent) == before


def _refused_before_loading(*argv: str) -> tuple[list[str], str]:
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=AssertionError("loaded")) as load:
        status, errors, stderr = extract(*argv)
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert load.call_count == 0
    return errors[0][len(ERROR) :]


def test_overwrite_refuses_a_folder_that_holds_no_saved_model_and_keeps_it_byte_for_byte(tiny_model_dir, tmp_path):
    """Before, `--overwrite_output_dir` deleted any folder: a home folder, a project."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "notes.txt").write_text("keep me")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = snapshot(tmp_path)
    line = _refused_before_loading(
        "--model_name_or_path", str(tiny_model_dir), "--num_layers", "2", "--output_dir", str(project),
        "--overwrite_output_dir",
    )  # fmt: skip
    assert line.startswith(f"--output_dir {project} holds no saved model (it holds .git, notes.txt, src)"), line
    assert "Choose an empty or new folder." in line
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["project"]


@pytest.mark.parametrize("layout", ["single", "one folder per exit"])
def test_overwrite_accepts_an_earlier_export(tiny_model_dir, old_export, layout):
    """An export (``config.json`` and weights), or a family of them (``N-layers`` folders), passes every check."""
    if layout != "single":
        family = old_export.parent / "family"
        for k in (2, 4):
            shutil.copytree(old_export, family / f"{k}-layers")
        old_export = family
    argv = ["--model_name_or_path", str(tiny_model_dir), "--num_layers", "2", "--output_dir", str(old_export)]
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=AssertionError("loaded")):
        with pytest.raises(AssertionError, match="loaded"):  # every check passed: the model was being loaded
            soft_peft_main(["extract", *argv, "--overwrite_output_dir"])


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_disk_that_fills_while_saving_says_so_in_one_line_and_changes_nothing(tiny_model_dir, old_export, overwrite):
    """Before: a traceback ending in the weight writer's error, which never said "No space left on device" plainly."""
    output = old_export if overwrite else old_export.parent / "new"
    before = snapshot(old_export.parent)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--num_layers", "2", "--output_dir", str(output)]
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch("transformers.modeling_utils.safe_save_file", side_effect=full):
        status, errors, stderr = extract(*argv, *(["--overwrite_output_dir"] if overwrite else []))
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0] == (
        f"{ERROR}--output_dir {output}: the export could not be written (no space left on device); nothing was "
        "changed there. Free space on its disk or choose another --output_dir."
    )
    assert snapshot(old_export.parent) == before and sorted(os.listdir(old_export.parent)) == ["out"]


def test_an_output_folder_that_refuses_writes_is_refused_before_loading(tiny_model_dir, tmp_path):
    """Permission bits do not stop root (the tests' user), and a network mount may refuse a write they allow: the
    folder's writes are made to fail (as they would there) where extract's check creates its probe file."""
    closed = tmp_path / "closed"
    closed.mkdir()
    with refusing_writes_in(closed):
        line = _refused_before_loading(
            "--model_name_or_path", str(tiny_model_dir), "--num_layers", "2", "--output_dir", str(closed / "sub")
        )
    assert (
        line
        == f"--output_dir {closed / 'sub'}: {closed} is not writable (permission denied); choose another --output_dir."
    )
    assert os.listdir(closed) == []
