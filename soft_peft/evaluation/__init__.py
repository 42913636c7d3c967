"""Per-exit evaluation of SoFT checkpoints: metrics, similarity to the last layer, generation and pairwise judging.

`soft-peft eval` runs [`run_evaluation`]; the pieces are usable alone: [`evaluate_exits`] (teacher-forced loss,
perplexity, token accuracy and exit-by-exit KL / cosine matrices over examples from [`load_eval_dataset`] and
[`tokenize_examples`]), [`generate_at_exits`] (greedy quality and time per token of each sub-model) and
[`judge_pairwise`] (wins / losses / ties of two sets of generations, both orders). Metric functions live in
`soft_peft.evaluation.metrics`, plots in `soft_peft.evaluation.report`.
"""

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
