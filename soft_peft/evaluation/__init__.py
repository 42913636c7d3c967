"""Per-exit evaluation of SoFT checkpoints: metrics, similarity to the last layer, generation and pairwise judging.

`soft-peft eval` runs [`run_evaluation`]; the pieces are usable alone: [`evaluate_exits`] (teacher-forced loss,
perplexity, token accuracy and exit-by-exit KL / cosine matrices over examples from [`load_eval_dataset`] and
[`tokenize_examples`]), [`generate_at_exits`] (greedy quality and time per token of each sub-model) and
[`judge_pairwise`] (wins / losses / ties of two sets of generations, both orders). Metric functions live in
`soft_peft.evaluation.metrics`, plots in `soft_peft.evaluation.report`.
"""

import importlib
import warnings

from .examples import EvalExample, load_eval_dataset, tokenize_examples
from .generation import ExitGenerations, generate_at_exits
from .judge import LMJudge, PairwiseResult, judge_pairwise
from .per_exit import ExitEvaluation, evaluate_exits
from .pipeline import EvalSettings, run_evaluation

__all__ = [
    "EvalExample",
    "EvalSettings",
    "ExitEvaluation",
    "ExitGenerations",
    "LMJudge",
    "PairwiseResult",
    "evaluate_exits",
    "generate_at_exits",
    "judge_pairwise",
    "load_eval_dataset",
    "run_evaluation",
    "tokenize_examples",
]

# Names this package exported in 0.1.0.dev0 that are internals of its modules: still importable from here for one
# release, with a warning naming their module (relative to this package, or absolute).
_MOVED = {
    "JUDGE_PROMPT": "judge",
    "cosine_similarity_matrix": "metrics",
    "detect_format": "soft_peft.data",
    "every_fourth_layer": "pipeline",
    "exact_match": "metrics",
    "gsm8k_exact_match": "metrics",
    "kl_divergence": "metrics",
    "kl_divergence_matrix": "metrics",
    "make_batches": "per_exit",
    "normalize_answer": "metrics",
    "perplexity": "metrics",
    "plot_exit_curves": "report",
    "plot_similarity": "report",
    "resolve_eval_exits": "pipeline",
    "score_generations": "generation",
    "token_f1": "metrics",
    "write_outputs": "report",
}


def __getattr__(name: str):
    if name in _MOVED:
        module = _MOVED[name] if _MOVED[name].startswith("soft_peft.") else f"{__name__}.{_MOVED[name]}"
        warnings.warn(
            f"`{__name__}.{name}` is deprecated and will be removed in the next release: import it from `{module}`.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
