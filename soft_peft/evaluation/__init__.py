"""Per-exit evaluation of SoFT checkpoints: metrics, similarity to the last layer, generation and pairwise judging.

Each name is imported from the module that defines it, its one import path. `soft-peft eval` runs
`soft_peft.evaluation.pipeline.run_evaluation` (with its `EvalSettings`); the pieces are usable alone:
`soft_peft.evaluation.per_exit.evaluate_exits` (teacher-forced loss, perplexity, token accuracy and exit-by-exit KL /
cosine matrices over examples from `soft_peft.evaluation.examples`: `load_eval_dataset`, `tokenize_examples`),
`soft_peft.evaluation.generation.generate_at_exits` (greedy quality and time per token of each sub-model) and
`soft_peft.evaluation.judge.judge_pairwise` (wins / losses / ties of two sets of generations, both orders). Metric
functions live in `soft_peft.evaluation.metrics`, plots in `soft_peft.evaluation.report`.
"""

__all__: list[str] = []
