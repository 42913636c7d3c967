"""Per-exit evaluation of SoFT checkpoints: metrics, similarity to the last layer, generation and pairwise judging.

`soft-peft eval` runs [`run_evaluation`]; the pieces are usable alone: [`evaluate_exits`] (teacher-forced loss,
perplexity, token accuracy and exit-by-exit KL / cosine matrices), [`generate_at_exits`] (greedy quality and time per
token of each sub-model) and [`judge_pairwise`] (wins / losses / ties of two sets of generations, both orders).
"""

from .data import EvalExample, detect_format, load_eval_dataset, tokenize_examples
from .generation import ExitGenerations, generate_at_exits, score_generations
from .judge import JUDGE_PROMPT, LMJudge, PairwiseResult, judge_pairwise
from .metrics import (
    cosine_similarity_matrix,
    exact_match,
    gsm8k_exact_match,
    kl_divergence,
    kl_divergence_matrix,
    normalize_answer,
    perplexity,
    token_f1,
)
from .per_exit import ExitEvaluation, evaluate_exits, make_batches
from .pipeline import EvalSettings, every_fourth_layer, resolve_eval_exits, run_evaluation
from .report import plot_exit_curves, plot_similarity, write_outputs

__all__ = [
    "JUDGE_PROMPT",
    "EvalExample",
    "EvalSettings",
    "ExitEvaluation",
    "ExitGenerations",
    "LMJudge",
    "PairwiseResult",
    "cosine_similarity_matrix",
    "detect_format",
    "evaluate_exits",
    "every_fourth_layer",
    "exact_match",
    "generate_at_exits",
    "gsm8k_exact_match",
    "judge_pairwise",
    "kl_divergence",
    "kl_divergence_matrix",
    "load_eval_dataset",
    "make_batches",
    "normalize_answer",
    "perplexity",
    "plot_exit_curves",
    "plot_similarity",
    "resolve_eval_exits",
    "run_evaluation",
    "score_generations",
    "token_f1",
    "tokenize_examples",
    "write_outputs",
]
