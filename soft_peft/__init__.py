"""soft-peft: Sorted Fine-Tuning (SoFT, arXiv 2309.08968) for the Hugging Face training stack.

Every prefix of a causal LM's decoder layers becomes a usable sub-model: the model's own final norm and shared LM
head are trained at several exits at once, with no new parameters.
"""

__version__ = "0.1.0.dev0"

from .config import SoFTConfig
from .evaluation import EvalSettings, evaluate_exits, judge_pairwise, run_evaluation
from .exits import default_exit_layers, find_exit_head, find_final_norm, parse_exit_layers, recorded_exit_layers
from .inference import dynamic_generate, extract_submodel, frequent_token_ids, self_speculative_generate
from .loss import exit_loss_weights, sorted_exit_loss
from .modeling import SortedExitOutput, SortedLossWrapper, add_sorted_exit_loss
from .trainer import SoFTTrainer

__all__ = [
    "EvalSettings",
    "SoFTConfig",
    "SoFTTrainer",
    "SortedExitOutput",
    "SortedLossWrapper",
    "__version__",
    "add_sorted_exit_loss",
    "default_exit_layers",
    "dynamic_generate",
    "evaluate_exits",
    "exit_loss_weights",
    "extract_submodel",
    "find_exit_head",
    "find_final_norm",
    "frequent_token_ids",
    "judge_pairwise",
    "parse_exit_layers",
    "recorded_exit_layers",
    "run_evaluation",
    "self_speculative_generate",
    "sorted_exit_loss",
]
