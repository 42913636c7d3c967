"""soft-peft: Sorted Fine-Tuning (SoFT, arXiv 2309.08968) for the Hugging Face training stack.

Every prefix of a causal LM's decoder layers becomes a usable sub-model: the model's own final norm and shared LM
head are trained at several exits at once, with no new parameters.
"""

__version__ = "0.1.0.dev0"

from .config import SoFTConfig
from .exits import default_exit_layers, find_exit_head, parse_exit_layers, recorded_exit_layers
from .loss import exit_loss_weights, sorted_exit_loss
from .modeling import SortedExitOutput, SortedLossWrapper, add_sorted_exit_loss
from .trainer import SoFTTrainer

__all__ = [
    "SoFTConfig",
    "SoFTTrainer",
    "SortedExitOutput",
    "SortedLossWrapper",
    "__version__",
    "add_sorted_exit_loss",
    "default_exit_layers",
    "exit_loss_weights",
    "find_exit_head",
    "parse_exit_layers",
    "recorded_exit_layers",
    "sorted_exit_loss",
]
