"""Decoding speed of SoFT's inference modes against plain greedy `generate` and `assistant_early_exit`.

Model: SmolLM2-135M-Instruct fine-tuned with the project's GSM8K example for 450 steps
(`~/.cache/soft_peft/runs/gsm8k-soft-450`, made by `bash benchmarks/decode_checkpoint.sh`); without it, the untrained
model, with a warning. Prompts: the GSM8K held-out split shared by all benchmarks (`held_out_split(test_size=200,
seed=0)`); the frequent-token subset is counted on the other rows' completions.

    python benchmarks/decode_speed.py --output /tmp/decode_speed.md                # default: ~7 min on 2 CPU cores
    python benchmarks/decode_speed.py --num_prompts 50 --max_new_tokens 256 --modes dynamic --batch_sizes 1

Timing is interleaved batch by batch across methods, in one process, so the ratios are side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from decode_harness import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    MODES,
    add_decode_method_flags,
    build_methods,
    decode_method_options,
    emit,
    format_table,
    gsm8k_benchmark_data,
    load_model,
    parse_ints,
    run_decode_benchmark,
    summary_rows,
)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_name_or_path", default=str(DEFAULT_MODEL), help="HF folder (default: SoFT GSM8K run)."
    )
    parser.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="GSM8K train: openai/gsm8k (default) or a local JSONL; prompts come from its held-out split.",
    )
    parser.add_argument("--num_prompts", type=int, default=4, help="Held-out prompts to decode.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=parse_ints, default=[1, 4])
    parser.add_argument(
        "--draft_exits", type=parse_ints, default=None, help="Default: up to 4 recorded exits below L."
    )
    parser.add_argument("--num_draft_tokens", default="adaptive", help="An int, or 'adaptive'.")
    parser.add_argument("--dynamic_exits", type=parse_ints, default=None, help="Default: dynamic_generate's default.")
    parser.add_argument("--thresholds", type=_floats, default=[0.9, 0.7, 0.5])
    parser.add_argument("--kv_fills", default="recompute,propagate", help="Dynamic KV fills to compare.")
    parser.add_argument(
        "--assistant_exits",
        type=parse_ints,
        default=None,
        help="Default: the draft exits (the ratio column uses the fastest).",
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=4096,
        help="Frequent training-completion tokens for drafting and confidence pre-checks; 0: the full head.",
    )
    add_decode_method_flags(parser)
    parser.add_argument("--modes", default=",".join(MODES), help="Modes besides greedy, comma-separated.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Model weights' dtype.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU).")
    parser.add_argument("--output", default=None, help="Also write the markdown table to this file.")
    parser.add_argument("--json", default=None, help="Also write the table's rows (and the command) to this file.")
    return parser.parse_args(argv)


@dataclass
class DecodeRun:
    """What one `decode_speed.py` run decodes, and with which methods' settings.

    Attributes:
        model, tokenizer, path: The loaded model (``path``: where it came from).
        num_layers, recorded: Its depth and recorded SoFT exits (``None`` when untrained).
        prompts, references: GSM8K held-out prompts and reference completions.
        vocab: The frequent-token subset, or ``None`` for the full head.
        method_args, method_kwargs: ``build_methods(model, *method_args, **method_kwargs)``.
    """

    model: torch.nn.Module
    tokenizer: object
    path: str
    num_layers: int
    recorded: list[int] | None
    prompts: list[str]
    references: list[str]
    vocab: torch.Tensor | None
    method_args: tuple
    method_kwargs: dict

    def header(self, args: argparse.Namespace, command: str) -> list[str]:
        """The report's first lines: model, prompts, vocabulary subset, machine and the command."""
        vocab = "none (full head)" if self.vocab is None else f"{self.vocab.numel()} ids"
        return [
            f"Model: `{self.path}` ({self.num_layers} layers, SoFT exits "
            f"{self.recorded or 'not recorded: untrained'}).",
            f"Prompts: {len(self.prompts)} GSM8K held-out, max_new_tokens={args.max_new_tokens}, {args.dtype}, "
            f"torch threads={args.threads}.",
            f"Vocabulary subset: {vocab} for drafting and confidence pre-checks, counted on the training completions.",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}.",
            f"Command: `{command.strip()}`",
            "",
        ]


def prepare_run(args: argparse.Namespace) -> DecodeRun:
    """Load the model and prompts of a run and resolve its draft exits, as `decode_speed.py` runs them."""
    from soft_peft.exits import num_decoder_layers, parse_exit_layers, recorded_exit_layers
    from soft_peft.inference import frequent_token_ids

    torch.set_num_threads(args.threads)
    model, tokenizer, path = load_model(args.model_name_or_path, getattr(torch, args.dtype))
    num_layers = num_decoder_layers(model)
    recorded = recorded_exit_layers(model)
    exits = [k for k in (recorded or parse_exit_layers(None, num_layers)) if k < num_layers]
    draft_exits = args.draft_exits or [exits[round(i * (len(exits) - 1) / 3)] for i in range(4)]
    draft_exits = sorted(set(draft_exits))
    draft_length = args.num_draft_tokens if args.num_draft_tokens == "adaptive" else int(args.num_draft_tokens)
    prompts, references, calibration = gsm8k_benchmark_data(args.data, args.num_prompts)
    vocab = frequent_token_ids(tokenizer, calibration, args.vocab_size) if args.vocab_size else None
    method_args = (
        args.max_new_tokens,
        draft_exits,
        draft_length,
        args.dynamic_exits,
        args.thresholds,
        args.assistant_exits or draft_exits,
    )
    method_kwargs = {
        "kv_fills": tuple(args.kv_fills.split(",")),
        "vocab": vocab,
        "modes": [mode for mode in args.modes.split(",") if mode],
        **decode_method_options(args),
    }
    return DecodeRun(
        model, tokenizer, path, num_layers, recorded, prompts, references, vocab, method_args, method_kwargs
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = prepare_run(args)
    methods = build_methods(run.model, *run.method_args, **run.method_kwargs)
    results = run_decode_benchmark(run.model, run.tokenizer, run.prompts, methods, args.batch_sizes)
    command = "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    emit(run.header(args, command), format_table(results, run.tokenizer, run.references), args.output)
    if args.json:
        rows = summary_rows(results, run.tokenizer, run.references)
        summary = {"model": run.path, "num_prompts": len(run.prompts), "command": command.strip(), "rows": rows}
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
