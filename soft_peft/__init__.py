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
# and `--version` answer without importing torch and transformers. Everything else is imported from its module
# (`soft_peft.exits`, `soft_peft.loss`, `soft_peft.schedule`, `soft_peft.inference`, `soft_peft.evaluation`, ...).
_LAZY = {
    "SoFTConfig": ".config",
    "SoFTSettings": ".settings",
    "SoFTTrainer": ".trainer",
    "SortedExitOutput": ".exit_forward",
    "SortedLossWrapper": ".wrapper",
    "add_sorted_exit_loss": ".wrapper",
    "dynamic_generate": ".inference",
    "extract_submodel": ".inference",
    "recorded_exit_layers": ".exits",
    "self_speculative_generate": ".inference",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .config import SoFTConfig
    from .exit_forward import SortedExitOutput
    from .exits import recorded_exit_layers
    from .inference import dynamic_generate, extract_submodel, self_speculative_generate
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
    # Subpackages as attributes (`soft_peft.inference.dynamic_generate`), as an eager `__init__` gave them
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
