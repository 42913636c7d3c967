"""Argument types shared by the subcommands' parsers (kept free of torch imports, so `--help` stays fast)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["OneLineErrorParser", "add_config_option", "parse_ints", "positive_int", "recipe_argv", "refuse_option"]


class OneLineErrorParser(argparse.ArgumentParser):
    """An `ArgumentParser` that refuses in one line, ``prog: error: message`` (exit 2), without argparse's usage
    block before it: as `soft-peft train` refuses."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_option(parser: argparse.ArgumentParser, ignored: dict[str, str] | None = None) -> None:
    """Give `parser` the `--config NAME|FILE` option that [`recipe_argv`] reads.

    Args:
        parser: The subcommand's parser.
        ignored: Recipe keys that are flags of this command but mean something else in a training recipe, each
            with the reason (`output_dir`: training's folder, not eval's report folder).
    """
    parser.set_defaults(_recipe_ignored=ignored or {})
    parser.add_argument(
        "--config",
        metavar="NAME|FILE",
        help="A training recipe (a shipped name, see `soft-peft recipes list`, or a YAML file): its keys that are "
        "flags of this command (model, dataset, ...) are read, flags given here override them; the others (the "
        "training settings) are not used, and are listed in one line.",
    )


def _config_value(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--config":
            return argv[index + 1] if index + 1 < len(argv) else ""
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def recipe_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with the `--config` recipe's keys that are flags of `parser` put in front of it as flags, so that the
    command line overrides them and each value is checked as if typed; the recipe's other keys are printed, in one
    line on stderr, as not used.

    Args:
        parser: The subcommand's parser, given [`add_config_option`].
        argv: The command line (without the subcommand's name).

    Returns:
        `argv` itself when it has no `--config`.
    """
    value = _config_value(argv)
    if value is None:
        return argv
    import yaml

    from .recipes import resolve_config

    try:
        with open(resolve_config(value), encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except (FileNotFoundError, OSError, yaml.YAMLError) as error:
        parser.error(str(error).splitlines()[0])
    if not isinstance(recipe, dict):
        parser.error(f"--config {value}: a recipe is a YAML mapping of flag names to values.")
    reasons = parser.get_default("_recipe_ignored")
    flags = {
        action.dest: action
        for action in parser._actions
        if f"--{action.dest}" in action.option_strings and action.help != argparse.SUPPRESS
    }
    front, unused = [], []
    for key, setting in recipe.items():
        action = flags.get(key)
        if action is None or key in reasons or key == "config" or setting is None:
            unused.append(f"{key} ({reasons[key]})" if key in reasons else str(key))
        elif action.nargs == 0:  # a switch (store_true): on when the recipe says true
            front += [f"--{key}"] if setting is True else []
        else:
            text = ",".join(map(str, setting)) if isinstance(setting, list) else str(setting)
            front += [f"--{key}", text]
    if unused:
        print(f"{parser.prog}: --config {value}: not used here: {', '.join(unused)}", file=sys.stderr)
    return front + argv


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
