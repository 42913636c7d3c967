"""The repository's benchmarks, one command per question: `train_cost`, `decode_cost`, `quality_study`,
`cli_startup` and `serve_vllm` (with vLLM's own Python), run from the repository root as
``python -m benchmarks.<command>`` (see benchmarks/README.md); `common` holds what they share."""
