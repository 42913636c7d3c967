"""Argument types shared by the decoding subcommands (kept free of torch imports, so `--help` stays fast)."""

from __future__ import annotations

__all__ = ["parse_ints"]


def parse_ints(text: str) -> list[int]:
    """``"9,12,"`` -> ``[9, 12]``: a comma-separated list of ints (empty parts skipped), as an argparse ``type``."""
    return [int(part) for part in text.split(",") if part.strip()]
