"""The repository's benchmarks, one command per question: `train_cost`, `decode_cost`, `quality_study` and
`cli_startup`, run from the repository root as ``python -m benchmarks.<command>`` (see benchmarks/README.md);
`common` holds what they share."""
