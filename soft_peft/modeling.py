"""Deprecated: this module is now [`soft_peft.wrapper`] (it wraps a model's forward; it defines no model).

Importing ``soft_peft.modeling`` still works for one release, with a ``FutureWarning``.
"""

import warnings

from .wrapper import SortedExitOutput, SortedLossWrapper, add_sorted_exit_loss

__all__ = ["SortedExitOutput", "SortedLossWrapper", "add_sorted_exit_loss"]

warnings.warn(
    "`soft_peft.modeling` is deprecated and will be removed in the next release; import from `soft_peft.wrapper` "
    "(or from `soft_peft`) instead.",
    FutureWarning,
    stacklevel=2,
)
