"""The release artefacts, as a PyPI user receives them: `python -m build` makes a wheel and an sdist, `twine check
--strict` passes, both carry the licence, the wheel ships the recipes and every module, and the sdist is a complete
source release whose tests run. The wheel, installed into a fresh virtual environment, trains one step from a
packaged recipe named on the command line, in a folder outside this checkout, with `soft-peft train` and with
`accelerate launch` and a packaged accelerate config. Passes from the system Python and from inside a virtualenv."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from example_runs import save_tiny_model
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd: Path, **env) -> str:
    # Without PYTHONPATH: a checkout on it would be imported instead of the installed wheel
    env = {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, **env}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def checkout_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts}


def fresh_venv(tmp_path: Path) -> Path:
    """A venv that sees this interpreter's packages (torch, transformers, ...) but no soft-peft; returns its python.

    `--system-site-packages` is not enough: run from a virtualenv it reaches the base interpreter's packages, not the
    virtualenv's, so the new venv adds this interpreter's site-packages itself. Without its own pip: the bundled
    setuptools would shadow the one seen here and break torch's requirement on it.
    """
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    venv_site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    sites = dict.fromkeys(
        [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    # An `import` line in a .pth file runs at start-up; addsitedir also runs those directories' own .pth files
    adds = "; ".join(f"site.addsitedir({path!r})" for path in sites if os.path.isdir(path))
    (Path(venv_site.strip()) / "parent_site_packages.pth").write_text(f"import site; {adds}\n")
    return python


def test_wheel_and_sdist_build_check_install_and_train_a_packaged_recipe(tmp_path):
    dist = tmp_path / "dist"
    # No isolation: build with the installed setuptools, no index needed. The wheel is built from the sdist
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=tmp_path)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    run([sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists], cwd=tmp_path)

    # The wheel: every module of this checkout, the recipes and launch configs under soft_peft/recipes/, the licence
    wheel = set(zipfile.ZipFile(wheels[0]).namelist())
    assert checkout_files("soft_peft", "*.py") | {"soft_peft/py.typed"} <= wheel
    shipped = {name.replace("recipes/", "soft_peft/recipes/", 1) for name in checkout_files("recipes", "*.yaml")}
    assert len(shipped) >= 10 and shipped <= wheel
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel)
    metadata = next(name for name in wheel if name.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheels[0]).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Project-URL: Source, https://github.com/soft-peft/soft-peft" in metadata

    # The sdist: a complete source release, its tests runnable
    with tarfile.open(sdists[0]) as archive:
        top = archive.getnames()[0].split("/")[0]
        sdist = {name.removeprefix(f"{top}/") for name in archive.getnames()}
        archive.extractall(tmp_path / "sdist", filter="data")
    expected = {"LICENSE", "CHANGELOG.md", "README.md", "setup.py", ".ci/min_versions.txt"}
    for folder in ("tests", "recipes", "examples", "data", "tools", "benchmarks", "docs"):
        expected |= checkout_files(folder, "*.py") | checkout_files(folder, "*.yaml") | checkout_files(folder, "*.md")
    assert expected - sdist == set()

    python = fresh_venv(tmp_path)
    venv = python.parents[1]
    script = venv / "bin" / "soft-peft"
    # No index: the install fails unless every dependency is already satisfied by what the venv sees
    run([python, "-m", "pip", "install", "--quiet", "--no-index", wheels[0]], cwd=tmp_path)
    location = run([python, "-c", "import soft_peft; print(soft_peft.__file__)"], cwd=tmp_path)
    assert location.strip().startswith(str(venv)), location
    assert "recipes" in run([script, "--help"], cwd=tmp_path)
    assert "--exit_layers" in run([script, "train", "--help"], cwd=tmp_path)
    # The sdist's own tests run against the installed wheel (this one needs no model)
    run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_repository.py"],
        cwd=tmp_path / "sdist" / top,
    )

    # A user's folder outside any clone: list, locate and copy the packaged recipes
    work = tmp_path / "work"
    work.mkdir()
    listing = run([script, "recipes"], cwd=work)
    assert "smollm2_135m_alpaca_cpu" in listing and "accelerate/zero3" in listing
    launch_config = Path(run([script, "recipes", "path", "accelerate/single"], cwd=work).strip())
    assert launch_config.is_file() and launch_config.is_relative_to(venv), launch_config
    run([script, "recipes", "copy", "smollm2_135m_alpaca_cpu"], cwd=work)
    assert (work / "smollm2_135m_alpaca_cpu.yaml").read_text() == (
        ROOT / "recipes/smollm2_135m_alpaca_cpu.yaml"
    ).read_text()

    # One training step from the packaged recipe by name (a tiny model and the Alpaca seed tasks shipped in data/)
    model = save_tiny_model(tmp_path / "tiny-llama")
    before = load_file(model / "model.safetensors")
    overrides = [
        "--model_name_or_path", model,
        "--dataset_name", ROOT / "data" / "alpaca_seed" / "seed_tasks_alpaca.jsonl",
        "--max_steps", "1",
        # The recipe's warm-up ratio makes a 1-step run's only step one at learning rate 0, which changes nothing
        "--warmup_steps", "0",
        "--per_device_train_batch_size", "2",
        "--exit_layers", "2,4",
    ]  # fmt: skip
    offline = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run(
        [script, "train", "--config", "smollm2_135m_alpaca_cpu", *overrides, "--output_dir", "cli"],
        cwd=work,
        **offline,
    )
    # The same through accelerate launch with the packaged launch config (the CPU flags a GPU-less machine needs)
    launch = [python, "-m", "accelerate.commands.launch", "--config_file", launch_config, "--cpu"]
    launch += ["--mixed_precision", "no", "-m", "soft_peft.cli", "train", "--config", "smollm2_135m_alpaca_cpu"]
    run([*launch, *overrides, "--output_dir", "launched"], cwd=work, **offline)
    for output in ("cli", "launched"):
        assert json.loads((work / output / "config.json").read_text())["soft_exit_layers"] == [2, 4]
        assert json.loads((work / output / "trainer_state.json").read_text())["global_step"] == 1
        trained = load_file(work / output / "model.safetensors")
        assert any(not torch.equal(trained[name], tensor) for name, tensor in before.items() if name in trained)
