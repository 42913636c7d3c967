"""Command-line flags for the decoding settings to compare, shared by `soft-peft bench` and `decode_speed.py`.

Kept free of torch imports, so `--help` stays fast.
"""

from __future__ import annotations

import argparse

__all__ = [
    "add_decode_method_flags",
    "decode_method_options",
    "parse_draft_stop_thresholds",
    "parse_early_draft_exit_sets",
    "parse_ints",
]


def parse_ints(text: str) -> list[int]:
    """``"9,12,"`` -> ``[9, 12]``: a comma-separated list of ints (empty parts skipped), as an argparse ``type``."""
    return [int(part) for part in text.split(",") if part.strip()]


def parse_draft_stop_thresholds(text: str) -> list[float | None]:
    """``"none,0.5"`` -> ``[None, 0.5]``: the command-line form of ``build_methods(draft_stop_thresholds=...)``."""
    return [None if part.strip().lower() == "none" else float(part) for part in text.split(",") if part.strip()]


def parse_early_draft_exit_sets(text: str) -> list[tuple[int, ...]]:
    """``"none/9/9,15"`` -> ``[(), (9,), (9, 15)]``: the command-line form of ``early_draft_exit_sets``."""
    return [() if part.strip().lower() in ("", "none") else tuple(parse_ints(part)) for part in text.split("/")]


def add_decode_method_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--dynamic_rules``, ``--draft_stop_thresholds`` and ``--early_draft_exits`` to ``parser``."""
    parser.add_argument(
        "--dynamic_rules",
        default="exact",
        help="Dynamic exit rules, comma-separated: exact (full-head confidence) and/or subset (exit_on_subset=True: "
        "decided on the vocabulary subset alone; approximate, faster).",
    )
    parser.add_argument(
        "--draft_stop_thresholds",
        default="none,0.5",
        help="draft_stop_threshold values to run each draft exit with, comma-separated; 'none': no confidence stop "
        "(default: without a stop and with the recommended 0.5).",
    )
    parser.add_argument(
        "--early_draft_exits",
        default="none",
        help="early_draft_exits settings, '/'-separated (e.g. 'none/9/9,15'); used with a draft stop threshold.",
    )


def decode_method_options(args: argparse.Namespace) -> dict:
    """The ``build_methods`` keyword arguments the flags of [`add_decode_method_flags`] stand for."""
    return {
        "dynamic_rules": [rule for rule in args.dynamic_rules.split(",") if rule],
        "draft_stop_thresholds": parse_draft_stop_thresholds(args.draft_stop_thresholds),
        "early_draft_exit_sets": parse_early_draft_exit_sets(args.early_draft_exits),
    }
