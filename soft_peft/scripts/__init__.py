"""Training entry points shared by `examples/*.py` and `soft-peft train` (parsed with TRL's `TrlParser`)."""

from .train import SoFTScriptArguments, make_parser, parse_args, train

__all__ = ["SoFTScriptArguments", "make_parser", "parse_args", "train"]
