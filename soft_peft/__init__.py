"""soft-peft: Sorted Fine-Tuning (SoFT, arXiv 2309.08968) for the Hugging Face training stack.

Every prefix of a causal LM's decoder layers becomes a usable sub-model: the model's own final norm and shared LM
head are trained at several exits at once, with no new parameters.

The top level holds the training and exit API and the three ways to run a SoFT model. Evaluation lives in
[`soft_peft.evaluation`] and is imported only when used (it needs the ``eval`` extra for plots).
"""

__version__ = "0.1.0.dev0"

import importlib
import importlib.util
import warnings
from typing import TYPE_CHECKING

# Each top-level name and the module that defines it. They load on first use (PEP 562), so that `soft-peft --help`
# and `--version` answer without importing torch and transformers; `from soft_peft import X` is unchanged.
_LAZY = {
    "SoFTConfig": ".config",
    "default_exit_layers": ".exits",
    "find_exit_head": ".exits",
    "find_final_norm": ".exits",
    "parse_exit_layers": ".exits",
    "parse_exit_spec": ".exits",
    "recorded_exit_layers": ".exits",
    "dynamic_generate": ".inference",
    "extract_submodel": ".inference",
    "frequent_token_ids": ".inference",
    "self_speculative_generate": ".inference",
    "exit_loss_weights": ".loss",
    "sorted_exit_loss": ".loss",
    "ExitSchedule": ".schedule",
    "scheduled_exit_weights": ".schedule",
    "SoFTTrainer": ".trainer",
    "SortedExitOutput": ".wrapper",
    "SortedLossWrapper": ".wrapper",
    "add_sorted_exit_loss": ".wrapper",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .config import SoFTConfig
    from .exits import (
        default_exit_layers,
        find_exit_head,
        find_final_norm,
        parse_exit_layers,
        parse_exit_spec,
        recorded_exit_layers,
    )
    from .inference import dynamic_generate, extract_submodel, frequent_token_ids, self_speculative_generate
    from .loss import exit_loss_weights, sorted_exit_loss
    from .schedule import ExitSchedule, scheduled_exit_weights
    from .trainer import SoFTTrainer
    from .wrapper import SortedExitOutput, SortedLossWrapper, add_sorted_exit_loss

__all__ = [
    "ExitSchedule",
    "SoFTConfig",
    "SoFTTrainer",
    "SortedExitOutput",
    "SortedLossWrapper",
    "__version__",
    "add_sorted_exit_loss",
    "default_exit_layers",
    "dynamic_generate",
    "exit_loss_weights",
    "extract_submodel",
    "find_exit_head",
    "find_final_norm",
    "frequent_token_ids",
    "parse_exit_layers",
    "parse_exit_spec",
    "recorded_exit_layers",
    "scheduled_exit_weights",
    "self_speculative_generate",
    "sorted_exit_loss",
]

# Names that 0.1.0.dev0 exported from the top level; they now live in `soft_peft.evaluation` only. Importing them from
# here still works for one release, with a warning, and loads evaluation lazily so `import soft_peft` stays light.
_MOVED_TO_EVALUATION = ("EvalSettings", "evaluate_exits", "judge_pairwise", "run_evaluation")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _MOVED_TO_EVALUATION:
        warnings.warn(
            f"`soft_peft.{name}` is deprecated and will be removed in the next release: import it from "
            f"`soft_peft.evaluation` instead (`from soft_peft.evaluation import {name}`).",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(".evaluation", __name__), name)
    # Subpackages as attributes (`soft_peft.inference.dynamic_generate`), as an eager `__init__` gave them
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
