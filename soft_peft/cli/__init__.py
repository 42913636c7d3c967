"""The `soft-peft` command: `soft-peft <subcommand> [options]`, in the manner of `trl sft`.

Each subcommand lives in its own module `soft_peft.cli.<name>` exposing `main(argv: list[str]) -> int`, imported only
when it runs: `soft-peft --help` and `--version` import neither torch nor transformers (benchmarks/cli_startup.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["SUBCOMMANDS", "main"]

# name -> one-line help. A subcommand is listed only when its module is present in this install.
SUBCOMMANDS = {
    "train": "Fine-tune with SoFT from a TrlParser YAML recipe plus command-line overrides.",
    "eval": "Per-exit evaluation (loss, perplexity, accuracy, similarity to the last layer) with a report and plots.",
    "generate": "Generate with a sub-model, self-speculative decoding or confidence-based early exit.",
    "extract": "Save a standalone sub-model of the first N layers.",
    "recipes": "List, locate (for `accelerate launch --config_file`) and copy the shipped recipes.",
}


def _available() -> dict[str, str]:
    return {name: text for name, text in SUBCOMMANDS.items() if importlib.util.find_spec(f"{__name__}.{name}")}


def _usage(commands: dict[str, str]) -> str:
    from .. import __version__

    width = max((len(name) for name in commands), default=0)
    lines = [
        f"soft-peft {__version__}: Sorted Fine-Tuning for causal LMs",
        "",
        "usage: soft-peft <command> [options]",
        "",
    ]
    lines += ["commands:"] + [f"  {name:<{width}}  {text}" for name, text in commands.items()]
    lines += ["", "Run `soft-peft <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `soft-peft` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(commands))
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in commands:
        print(f"soft-peft: unknown command {name!r}; expected one of: {', '.join(commands)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{name}")
    try:
        return int(module.main(argv[1:]) or 0)
    except BrokenPipeError:
        # The reader went away (`soft-peft recipes list | head -1`): no traceback, and none at exit either, when
        # Python flushes stdout into the closed pipe. 141 = 128 + SIGPIPE, what a shell reports for such a command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
