"""What the tests of `soft-peft train`'s checks share (tests/cli/test_train_*.py): a guard that fails a run reaching
the weights or the data, the command line of a tiny run, and the one error line a refused run prints."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from example_runs import alpaca_rows, write_jsonl
from transformers import AutoModelForCausalLM

import soft_peft.cli.train as train_module
from soft_peft.cli.train import main as train_main

__all__ = ["Loaded", "alpaca_data", "refuse_loading", "train_argv", "train_error"]


class Loaded(Exception):
    """Raised where the script would start loading: reaching it means every check passed."""


def refuse_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading weights or the dataset raise [`Loaded`]: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise Loaded("loaded before the checks")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(train_module, "_load_datasets", refuse)


def alpaca_data(folder: Path) -> Path:
    """A small Alpaca JSONL file in ``folder``."""
    return write_jsonl(folder / "alpaca.jsonl", alpaca_rows())


def train_argv(model_dir, data, output_dir, *flags: str) -> list[str]:
    """The `soft-peft train` arguments of a run of ``model_dir`` on ``data`` into ``output_dir``, plus ``flags``."""
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(output_dir),
        *flags,
    ]


def train_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run `soft-peft train argv`, expect exit code 2, and return its one error line (no traceback)."""
    assert train_main(argv) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("soft-peft train: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@contextlib.contextmanager
def refusing_writes_in(folder: Path) -> Iterator[None]:
    """New files in ``folder`` fail with EACCES while this lasts. Permission bits do not stop root (the tests' user),
    and a network mount may refuse a write they allow: the folder's writes are made to fail as they would there."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(folder) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    with mock.patch("os.open", refusing_open):
        yield
