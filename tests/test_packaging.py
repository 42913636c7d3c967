"""The release artefacts: `python -m build` makes a wheel and an sdist, `twine check` passes, and the wheel installed
into a fresh virtual environment imports and runs `soft-peft --help` (the wheel's copy, not this checkout). Passes
from the system Python and from inside a virtualenv alike."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd: Path) -> str:
    # Without PYTHONPATH: a checkout on it would be imported instead of the installed wheel
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
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

    # A fresh venv that sees this interpreter's packages (torch, transformers, ...) but installs soft-peft from the
    # wheel only. `--system-site-packages` is not enough: run from a virtualenv it reaches the base interpreter's
    # packages, not the virtualenv's, so the new venv adds this interpreter's site-packages itself. Without its own
    # pip: the bundled setuptools would shadow the one seen here and break torch's requirement on it
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "soft-peft"
    venv_site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    sites = dict.fromkeys(
        [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    # An `import` line in a .pth file runs at start-up; addsitedir also runs those directories' own .pth files
    adds = "; ".join(f"site.addsitedir({path!r})" for path in sites if os.path.isdir(path))
    (Path(venv_site.strip()) / "parent_site_packages.pth").write_text(f"import site; {adds}\n")
    # No index: the install fails unless every dependency is already satisfied by what the venv sees
    run([python, "-m", "pip", "install", "--quiet", "--no-index", wheels[0]], cwd=tmp_path)
    location = run([python, "-c", "import soft_peft; print(soft_peft.__file__)"], cwd=tmp_path)
    assert location.strip().startswith(str(venv)), location
    assert "train" in run([script, "--help"], cwd=tmp_path)
    assert "--exit_layers" in run([script, "train", "--help"], cwd=tmp_path)
