"""Argument types shared by the subcommands' parsers (kept free of torch imports, so `--help` stays fast)."""

from __future__ import annotations

import argparse

__all__ = ["parse_ints", "positive_int", "refuse_option"]


def parse_ints(text: str) -> list[int]:
    """``"9,12,"`` -> ``[9, 12]``: a comma-separated list of ints (empty parts skipped), as an argparse ``type``."""
    return [int(part) for part in text.split(",") if part.strip()]


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def refuse_option(parser: argparse.ArgumentParser, option: str, message: str) -> None:
    """Give ``parser`` a hidden ``option`` that is refused with ``message`` (exit 2).

    For a flag users bring from another subcommand, where it means something else: `--exit_layers` is training's
    exits, so `soft-peft eval --exit_layers 9,15` should say which flag eval takes, not only "unrecognized arguments".

    Args:
        parser: The subcommand's parser.
        option: The refused flag.
        message: The error line: what the flag means, and the flag to use here.
    """

    class _Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(message)

    parser.add_argument(option, nargs="?", help=argparse.SUPPRESS, action=_Refuse)
