"""Decoding cost of SoFT's decoders, measured side by side in one process. Three questions, one command each:

    # How fast each decoder is against greedy `generate` and transformers' `assistant_early_exit` (speed, exactness,
    # GSM8K accuracy, batch by batch): self-speculative decoding per draft exit, dynamic exits per threshold
    python -m benchmarks.decode_cost speed --num_prompts 4 --max_new_tokens 64         # ~7 min on 2 CPU cores
    # How far self-speculative decoding can go on this machine: every draft accepted, and a perfect draft stop
    python -m benchmarks.decode_cost ceiling --draft_exits 9,15,21 --max_draft 8       # ~5 min on 2 CPU cores
    python -m benchmarks.decode_cost ceiling --shape llama3.2-1b --draft_exits 4,8,12 --max_draft 4   # a GPU, 1 min
    # A SoFT exit as a separate draft model (`soft-peft extract` + `assistant_model`) against the shared-cache decoder
    python -m benchmarks.decode_cost draft-model --num_prompts 4 --draft_exits 15,21

Model: a SoFT checkpoint (`--model_name_or_path`; default `~/.cache/soft_peft/runs/gsm8k-soft-450`, made by
`bash benchmarks/decode_checkpoint.sh`; without it, the untrained SmolLM2-135M-Instruct, with a warning), or for
`ceiling` a random-init model of a known shape (`--shape`: the mechanics, which a GPU changes, not a checkpoint's
acceptance). Prompts: GSM8K's held-out split shared by all benchmarks (`held_out_split(test_size=200, seed=0)` of
`openai/gsm8k`, or of `--data FILE`); the frequent-token subset is counted on the other rows' completions.
"""

from __future__ import annotations

import argparse
import json
import sys
from argparse import RawDescriptionHelpFormatter as RawDescription
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import machine_line, parse_floats, parse_ints
from benchmarks.decode_harness import (
    MODES,
    add_decode_method_flags,
    add_model_arguments,
    build_methods,
    decode_method_options,
    emit,
    format_table,
    gsm8k_benchmark_data,
    load_model,
    run_decode_benchmark,
    summary_rows,
)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The `speed` command's flags."""
    add_model_arguments(parser)
    parser.add_argument("--num_prompts", type=int, default=4, help="Held-out prompts to decode.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=parse_ints, default=[1, 4])
    parser.add_argument(
        "--draft_exits", type=parse_ints, default=None, help="Default: up to 4 recorded exits below L."
    )
    parser.add_argument("--num_draft_tokens", default="adaptive", help="An int, or 'adaptive'.")
    parser.add_argument("--dynamic_exits", type=parse_ints, default=None, help="Default: dynamic_generate's default.")
    parser.add_argument("--thresholds", type=parse_floats, default=[0.9, 0.7, 0.5])
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
    parser.add_argument("--json", default=None, help="Also write the table's rows (and the command) to this file.")


@dataclass
class DecodeRun:
    """What one `speed` run decodes, and with which methods' settings.

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
            machine_line(),
            f"Command: `{command.strip()}`",
            "",
        ]


def prepare_run(args: argparse.Namespace) -> DecodeRun:
    """Load the model and prompts of a run and resolve its draft exits, as `speed` runs them."""
    from soft_peft import recorded_exit_layers
    from soft_peft.exits import parse_exit_layers
    from soft_peft.inference.vocab import frequent_token_ids
    from soft_peft.model_layout import num_decoder_layers

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


def speed(args: argparse.Namespace, command: str) -> int:
    """The `speed` command: every method on the same prompts, one table (and its rows as JSON with ``--json``)."""
    run = prepare_run(args)
    methods = build_methods(run.model, *run.method_args, **run.method_kwargs)
    results = run_decode_benchmark(run.model, run.tokenizer, run.prompts, methods, args.batch_sizes)
    emit(run.header(args, command), format_table(results, run.tokenizer, run.references), args.output)
    if args.json:
        rows = summary_rows(results, run.tokenizer, run.references)
        summary = {"model": run.path, "num_prompts": len(run.prompts), "command": command, "rows": rows}
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`speed`, `ceiling` and `draft-model`, each with its own flags."""
    from benchmarks.decode_ceiling import add_ceiling_arguments
    from benchmarks.decode_draft_model import add_draft_model_arguments

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_cost", description=__doc__, formatter_class=RawDescription
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_speed_arguments(commands.add_parser("speed", help="Each decoder's speed against greedy `generate`."))
    add_ceiling_arguments(commands.add_parser("ceiling", help="Self-speculative decoding's two upper bounds."))
    add_draft_model_arguments(commands.add_parser("draft-model", help="A SoFT exit as a separate draft model."))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one decoding benchmark (see the module's docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m benchmarks.decode_cost", *argv])
    if args.command == "speed":
        return speed(args, command)
    if args.command == "ceiling":
        from benchmarks.decode_ceiling import ceiling

        return ceiling(args, command)
    from benchmarks.decode_draft_model import draft_model

    return draft_model(args, command)


if __name__ == "__main__":
    sys.exit(main())
