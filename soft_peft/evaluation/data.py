"""Deprecated: this module is now [`soft_peft.evaluation.examples`] (tokenized evaluation examples); formats are
told apart by [`soft_peft.data.detect_format`], shared with training.

Importing ``soft_peft.evaluation.data`` still works for one release, with a ``FutureWarning``.
"""

import warnings

from ..data import detect_format
from .examples import EvalExample, load_eval_dataset, tokenize_examples

__all__ = ["EvalExample", "detect_format", "load_eval_dataset", "tokenize_examples"]

warnings.warn(
    "`soft_peft.evaluation.data` is deprecated and will be removed in the next release; import from "
    "`soft_peft.evaluation` (or `soft_peft.data` for `detect_format`) instead.",
    FutureWarning,
    stacklevel=2,
)
