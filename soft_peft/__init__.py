"""soft-peft: Sorted Fine-Tuning (SoFT, arXiv 2309.08968) for the Hugging Face training stack.

Every prefix of a causal LM's decoder layers becomes a usable sub-model: the model's own final norm and shared LM
head are trained at several exits at once, with no new parameters.

The top level holds the training and exit API and the three ways to run a SoFT model. Evaluation lives in
[`soft_peft.evaluation`] and is imported only when used (it needs the ``eval`` extra for plots).
"""

__version__ = "0.1.0"

import importlib
import importlib.util
from typing import TYPE_CHECKING

# Each top-level name and the module that defines it. They load on first use (PEP 562), so that `soft-peft --help`
# and `--version` answer without importing torch and transformers. The top level is these names' one import path (their
# modules leave them out of `__all__`); every other public name is imported from the module that defines it
# (`soft_peft.exits`, `soft_peft.loss`, `soft_peft.inference.vocab`, `soft_peft.evaluation.pipeline`, ...).
_LAZY = {
    "SoFTConfig": ".config",
    "SoFTSettings": ".settings",
    "SoFTTrainer": ".trainer",
    "SortedExitOutput": ".exit_forward",
    "SortedLossWrapper": ".wrapper",
    "add_sorted_exit_loss": ".wrapper",
    "dynamic_generate": ".inference.dynamic",
    "extract_submodel": ".inference.submodel",
    "recorded_exit_layers": ".exits",
    "self_speculative_generate": ".inference.speculative",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .config import SoFTConfig
    from .exit_forward import SortedExitOutput
    from .exits import recorded_exit_layers
    from .inference.dynamic import dynamic_generate
    from .inference.speculative import self_speculative_generate
    from .inference.submodel import extract_submodel
    from .settings import SoFTSettings
    from .trainer import SoFTTrainer
    from .wrapper import SortedLossWrapper, add_sorted_exit_loss

__all__ = [
    "SoFTConfig",
    "SoFTSettings",
    "SoFTTrainer",
    "SortedExitOutput",
    "SortedLossWrapper",
    "__version__",
    "add_sorted_exit_loss",
    "dynamic_generate",
    "extract_submodel",
    "recorded_exit_layers",
    "self_speculative_generate",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    # Subpackages and modules as attributes (`soft_peft.layer_dropout.LayerDropout`), as an eager `__init__` gave them
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
