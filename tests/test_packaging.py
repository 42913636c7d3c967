"""The release artefacts: `python -m build` makes a wheel and an sdist, `twine check` passes, and the wheel installed
into a fresh virtual environment imports and runs `soft-peft --help` (the wheel's copy, not this checkout)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_and_sdist_build_check_install_and_run(tmp_path):
    dist = tmp_path / "dist"
    # No isolation: build with the installed setuptools, no index needed
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=tmp_path)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    run([sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists], cwd=tmp_path)
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert {"soft_peft/py.typed", "soft_peft/cli/train.py", "soft_peft/scripts/train.py"} <= set(names)

    # A fresh venv that sees the system's torch/transformers but installs soft-peft from the wheel only. Without its
    # own pip: the bundled setuptools would shadow the system's and break torch's requirement on it
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "soft-peft"
    # No index: the install fails unless every dependency is already satisfied by what the venv sees
    run([python, "-m", "pip", "install", "--quiet", "--no-index", wheels[0]], cwd=tmp_path)
    location = run([python, "-c", "import soft_peft; print(soft_peft.__file__)"], cwd=tmp_path)
    assert location.strip().startswith(str(venv)), location
    assert "train" in run([script, "--help"], cwd=tmp_path)
    assert "--exit_layers" in run([script, "train", "--help"], cwd=tmp_path)
