"""`python -m benchmarks.cli_startup`: each command is timed in a fresh process, and the heavy modules a command
loaded are read from that process."""

from __future__ import annotations

import sys

from benchmarks import cli_startup


def test_loaded_modules_are_the_commands_own():
    assert cli_startup.loaded_modules([sys.executable, "-c", "pass"]) == "none"
    assert cli_startup.loaded_modules([sys.executable, "-c", "import json"]) == "none"
    assert cli_startup.loaded_modules([sys.executable, "-c", "import torch"]) == "torch"
    assert cli_startup.loaded_modules(["soft-peft", "--version"]) == "?"  # another program: not probed


def test_every_command_is_timed_in_a_new_process(tmp_path):
    marker = tmp_path / "runs.txt"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    seconds = cli_startup.time_command(command, 3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert marker.read_text() == "xxx"


def test_the_measured_commands_start_with_the_bare_interpreter():
    commands = cli_startup.commands()
    first = next(iter(commands.values()))
    assert first == [sys.executable, "-c", "pass"]
    assert commands["python -m soft_peft.cli --version"] == [sys.executable, "-m", "soft_peft.cli", "--version"]


def test_the_subcommands_help_loads_no_heavy_module():
    """`soft-peft eval --help` once imported torch, transformers and datasets first (~9 s)."""
    for name in ("eval", "generate", "extract"):
        assert cli_startup.loaded_modules(cli_startup.commands()[f"python -m soft_peft.cli {name} --help"]) == "none"
