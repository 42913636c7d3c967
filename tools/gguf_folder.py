"""Turn a GGUF checkpoint into a plain HF model folder, once, for the `tools/get_*.py` loaders (which share it).

transformers dequantises a GGUF on load, but flags the model quantized and `save_pretrained` refuses it; the model is
rebuilt from its config without `quantization_config` and the dequantised weights loaded into it. The folder is
written beside the target and renamed into place, so an interrupted conversion never leaves a half folder behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def is_converted(target: Path) -> bool:
    """Whether ``target`` already holds a converted model (config and weights)."""
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def gguf_to_folder(
    target: Path, fetch_gguf: Callable[[Path], Path], extra_files: dict[str, str | Path] | None = None
) -> Path:
    """Return ``target``, converting the GGUF that ``fetch_gguf`` provides into it (fp32) unless already there.

    Args:
        target: The model folder.
        fetch_gguf: ``fetch_gguf(workdir)`` returns the GGUF file's path; it may write it in the temporary ``workdir``.
        extra_files: File name -> text (``str``) or file to copy (``Path``), written into the folder (licence notes).
    """
    target = Path(target)
    if is_converted(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gguf"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = fetch_gguf(Path(tmp))
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
        for file_name, content in (extra_files or {}).items():
            if isinstance(content, Path):
                shutil.copyfile(content, partial / file_name)
            else:
                (partial / file_name).write_text(content)
        if target.exists():  # an earlier, interrupted conversion
            shutil.rmtree(target)
        partial.replace(target)
    return target


@contextlib.contextmanager
def stdout_to_stderr():
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


def run_cli(description: str, default: Path, convert: Callable[[Path], Path], argv: list[str] | None) -> int:
    """A loader's command line: convert into the folder given (or ``default``) and print it, alone, on stdout."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("target", nargs="?", type=Path, default=default, help=f"Folder (default {default}).")
    target = parser.parse_args(argv).target
    # Libraries log while converting (DeepSpeed: "Setting accelerator to CPU") and some log to stdout
    with stdout_to_stderr():
        folder = convert(target)
    print(folder)
    return 0
