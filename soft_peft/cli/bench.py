"""`soft-peft bench`: side-by-side decoding speed of greedy, self-speculative, dynamic and assistant_early_exit.

    soft-peft bench --model_name_or_path RUN --data gsm8k/train.jsonl [--num_prompts 4 --max_new_tokens 64 ...]

Same measurement as `benchmarks/decode_speed.py` (see it for the defaults); prints a markdown table.
"""

from __future__ import annotations

import argparse

from ..hub import ModelNotFoundError, resolve_model_path
from .decode_flags import add_decode_method_flags, decode_method_options, parse_ints

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run `soft-peft bench`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="soft-peft bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--data", required=True, help="GSM8K JSONL; prompts come from the shared held-out split.")
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=parse_ints, default=[1, 4])
    parser.add_argument("--draft_exits", type=parse_ints, required=True, help="e.g. 12,18,24")
    parser.add_argument("--thresholds", default="0.9,0.7", help="Dynamic thresholds, one run each.")
    parser.add_argument("--assistant_exits", type=parse_ints, default=[], help="assistant_early_exit settings (slow).")
    parser.add_argument(
        "--vocab_size", type=int, default=4096, help="Frequent-token subset for drafts and pre-checks; 0: full head."
    )
    add_decode_method_flags(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    try:
        model_path = resolve_model_path(args.model_name_or_path)
    except ModelNotFoundError as error:
        parser.error(str(error))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..inference import frequent_token_ids
    from ..inference.benchmark import build_methods, format_table, gsm8k_benchmark_data, run_decode_benchmark

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts, answers, calibration = gsm8k_benchmark_data(args.data, args.num_prompts)
    vocab = frequent_token_ids(tokenizer, calibration, args.vocab_size) if args.vocab_size > 0 else None
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    methods = build_methods(
        model, args.max_new_tokens, args.draft_exits, "adaptive", None, thresholds, args.assistant_exits, vocab=vocab,
        **decode_method_options(args),
    )  # fmt: skip
    results = run_decode_benchmark(model, tokenizer, prompts, methods, args.batch_sizes)
    table = format_table(results, tokenizer, answers)
    print(table)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(table + "\n")
    return 0
