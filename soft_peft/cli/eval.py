"""`soft-peft eval`: per-exit evaluation of a checkpoint, optionally against a second one, with a report and plots.

```bash
soft-peft eval --model_name_or_path runs/soft --dataset_name data/gsm8k.jsonl --output_dir eval/soft --max_samples 64
soft-peft eval --model_name_or_path runs/soft --compare_to runs/sft --dataset_name data/gsm8k.jsonl \
    --output_dir eval/soft_vs_sft --exits 9,12,15,18,21,24,27,30 --generate --max_new_tokens 192
```

Exits: by default the model's recorded `soft_exit_layers` (written by SoFTTrainer). A model without them is an error
unless `--exits` is given: `--exits default` means every 4th layer plus the last. With `--compare_to`, a
model without recorded exits uses the other model's. The last layer is always evaluated (it is the reference).
Writes `metrics.json`, `report.md`, `exit_curves.png`, `similarity_kl.png` and `similarity_cosine.png`.
`--config RECIPE` reads the training recipe's keys that are flags here (model, dataset, `max_length`); the split
evaluated is `--dataset_test_split`, as in training.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

from ..hub import resolve_model_path
from ..prompt_templates import DATASET_FORMATS
from .arg_types import OneLineErrorParser, add_config_option, positive_int, recipe_argv, refuse_option
from .preflight import UsageError, check_model_files, check_output_dir, read_model_facts

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "soft-peft eval") -> argparse.ArgumentParser:
    """The `soft-peft eval` argument parser."""
    parser = OneLineErrorParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # A training recipe's output_dir is the trained model's folder, which eval reads (--model_name_or_path)
    add_config_option(parser, ignored={"output_dir": "training's folder; pass eval's own --output_dir"})
    parser.add_argument("--model_name_or_path", required=True, help="Model A: a folder or Hub name.")
    parser.add_argument("--compare_to", help="Model B, compared exit by exit (same tokenizer vocabulary).")
    parser.add_argument(
        "--dataset_name",
        required=True,
        help="JSON/JSONL/Parquet/CSV file or Hub dataset, in any format training takes (see --dataset_format).",
    )
    parser.add_argument(
        "--dataset_format",
        default="auto",
        choices=DATASET_FORMATS,
        help="Row format, as `soft-peft train` takes it; 'auto' (default) tells it by the columns: 'messages', "
        "'prompt'/'completion', Alpaca 'instruction'/'output', 'question'/'answer' (GSM8K, TriviaQA), 'text'.",
    )
    parser.add_argument(
        "--dataset_test_split",
        default="test",
        help="The split evaluated, as training's --dataset_test_split (a single file is its one split).",
    )
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_samples", type=positive_int, help="Evaluate only the first N rows.")
    parser.add_argument(
        "--exits",
        help="Exits to evaluate: 'default' (every 4th layer + last), '9,12,30' or 'start:stop:step'. Default: the "
        "recorded exits.",
    )
    refuse_option(
        parser,
        "--exit_layers",
        "--exit_layers is training's setting (the exits a model is trained at); the exits to evaluate are --exits, "
        "such as --exits 9,15,30.",
    )
    parser.add_argument("--batch_size", type=positive_int, default=4)
    parser.add_argument("--max_length", type=positive_int, default=1024, help="Truncate examples to this many tokens.")
    parser.add_argument("--token_chunk_size", type=positive_int, default=64, help="Completion tokens per head pass.")
    parser.add_argument("--generate", action="store_true", help="Greedy-decode each exit and score it.")
    parser.add_argument("--max_new_tokens", type=positive_int, default=256)
    parser.add_argument(
        "--generate_samples", type=positive_int, help="Rows used for generation (default: all evaluated)."
    )
    parser.add_argument("--judge_model", help="Local causal LM judging model A's exits vs model B's last layer.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    return parser


def _check_exits_before_loading(args: argparse.Namespace) -> None:
    """Resolve each model's exits from its config alone, as the evaluation will once the weights are loaded.

    Raises:
        ValueError: for exits outside a model's depth, or a model without recorded exits and no `--exits`.
    """
    # A missing folder or an unreachable Hub is said first, in one line (ModelNotFoundError is a ValueError)
    names = [resolve_model_path(name) for name in (args.model_name_or_path, args.compare_to) if name]
    facts = [read_model_facts(name) for name in names]
    for name in names:  # the evaluation loads each model's own tokenizer
        check_model_files(name, tokenizer_flag=None)
    from ..evaluation.pipeline import resolve_eval_exits

    # The evaluation's own resolution, given objects that carry only the configs
    models = [SimpleNamespace(config=fact.config) for fact in facts]
    fallback = facts[1].recorded_exits if len(facts) == 2 else None
    exits = resolve_eval_exits(models[0], args.exits, facts[0].name, fallback=fallback)
    if len(facts) == 2:
        resolve_eval_exits(models[1], args.exits, facts[1].name, fallback=exits)


def main(argv: list[str] | None = None) -> int:
    """Run `soft-peft eval` with `argv`; returns 0, or 2 with a message on stderr for unusable input."""
    parser = build_parser()
    args = parser.parse_args(recipe_argv(parser, list(sys.argv[1:] if argv is None else argv)))
    # Imported after parsing: `--help` and a refused flag answer without loading torch
    from ..data_rows import DatasetFormatError
    from ..evaluation.pipeline import EvalSettings, run_evaluation
    from ..evaluation.report import require_matplotlib

    try:
        # The plots need the `eval` extra, which `pip install soft-peft` does not bring: say so in one line, not as a
        # traceback (run_evaluation checks it too, for API users)
        require_matplotlib()
    except ImportError as error:
        print(f"soft-peft eval: error: {error}", file=sys.stderr)
        return 2
    settings = EvalSettings(
        model_name_or_path=args.model_name_or_path,
        dataset_name=args.dataset_name,
        output_dir=args.output_dir,
        compare_to=args.compare_to,
        exits=args.exits,
        max_samples=args.max_samples,
        dataset_test_split=args.dataset_test_split,
        dataset_config=args.dataset_config,
        dataset_format=args.dataset_format,
        batch_size=args.batch_size,
        max_length=args.max_length,
        token_chunk_size=args.token_chunk_size,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        generate_samples=args.generate_samples,
        judge_model=args.judge_model,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    import torch

    # Far-tail probabilities underflow to denormal floats, which CPUs process many times slower; zero is as good
    torch.set_flush_denormal(True)
    try:
        # The outputs are written last: an unusable --output_dir must fail now, not after the whole evaluation
        check_output_dir(args.output_dir, overwrite=True)
        _check_exits_before_loading(args)
        metrics = run_evaluation(settings)
    except (ValueError, DatasetFormatError, UsageError) as error:
        print(f"soft-peft eval: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote metrics.json, report.md and plots for {len(metrics['exits'])} exits to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
