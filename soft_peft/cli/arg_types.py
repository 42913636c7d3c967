"""Argument types shared by the subcommands' parsers (kept free of torch imports, so `--help` stays fast)."""

from __future__ import annotations

import argparse

__all__ = ["parse_ints", "positive_int"]


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
