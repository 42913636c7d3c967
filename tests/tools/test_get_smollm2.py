"""`tools/get_smollm2.py` prints the model folder and nothing else on stdout, so `$(python tools/get_smollm2.py)`
is the path even when the conversion's libraries log (DeepSpeed writes "Setting accelerator to CPU" to stdout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"

# A stand-in conversion that writes to stdout both ways libraries do: through sys.stdout and to descriptor 1
NOISY_RUN = """
import os, sys
import get_smollm2 as tool

def noisy_conversion(target):
    print("[WARNING] [real_accelerator.py:260:get_accelerator] Setting accelerator to CPU.")
    os.write(1, b"written to descriptor 1\\n")
    return target

tool.get_smollm2 = noisy_conversion
sys.exit(tool.main([sys.argv[1]]))
"""


def run_tool(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=TOOLS, capture_output=True, text=True, timeout=300, check=False)


def test_logs_written_while_converting_go_to_stderr(tmp_path):
    result = run_tool(["-c", NOISY_RUN, str(tmp_path / "model")])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'model'}\n"
    assert "Setting accelerator to CPU" in result.stderr and "written to descriptor 1" in result.stderr


@pytest.mark.slow
def test_prints_the_cached_folder_as_the_only_line(smollm2_path):
    result = run_tool([str(TOOLS / "get_smollm2.py")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(smollm2_path)]
