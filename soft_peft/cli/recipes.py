"""`soft-peft recipes`: list, locate and copy the recipes that ship with soft-peft.

The training recipes (`TrlParser` YAML, for `soft-peft train --config`) and the accelerate launch configs (for
`accelerate launch --config_file`) live in the repository's top-level `recipes/` folder and ship inside the wheel as
`soft_peft/recipes/`. A recipe is named by its file stem (`smollm2_135m_alpaca_cpu`), a launch config by
`accelerate/<stem>` (`accelerate/zero3`):

```bash
soft-peft recipes                                       # list them
soft-peft recipes copy smollm2_135m_alpaca_cpu          # ./smollm2_135m_alpaca_cpu.yaml, to edit
soft-peft train --config smollm2_135m_alpaca_cpu        # train from the shipped recipe by name
accelerate launch --config_file "$(soft-peft recipes path accelerate/zero3)" \\
    -m soft_peft.cli train --config llama2_13b_alpaca_zero3
```
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import sys
from pathlib import Path

__all__ = ["closest_name", "main", "recipe_names", "recipes_dir", "resolve_config"]

ACCELERATE = "accelerate"


def recipes_dir() -> Path:
    """The folder of the shipped recipes.

    Returns:
        `soft_peft/recipes/` in an installed wheel; in a clone (an editable install, or the checkout on `PYTHONPATH`)
        the repository's own `recipes/`, which the wheel copies.
    """
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "recipes", package.parent / "recipes"):
        if (folder / ACCELERATE).is_dir():
            return folder
    raise FileNotFoundError(f"no recipes folder beside {package}: a broken install? Reinstall soft-peft.")


def recipe_names() -> list[str]:
    """The shipped names: the training recipes' stems, then `accelerate/<stem>` for each launch config."""
    folder = recipes_dir()
    training = sorted(path.stem for path in folder.glob("*.yaml"))
    return training + sorted(f"{ACCELERATE}/{path.stem}" for path in (folder / ACCELERATE).glob("*.yaml"))


def _shipped(name: str) -> Path | None:
    name = name.removesuffix(".yaml")
    return recipes_dir() / f"{name}.yaml" if name in recipe_names() else None


def closest_name(name: str) -> str | None:
    """The shipped name a mistyped `name` most likely meant, or None when none is close.

    Args:
        name: The name the user gave (with or without `.yaml`).
    """
    close = difflib.get_close_matches(name.removesuffix(".yaml"), recipe_names(), n=1)
    return close[0] if close else None


def resolve_config(value: str) -> str:
    """The recipe file that `--config value` means: an existing file as given, else a shipped recipe of that name.

    Args:
        value: A path to a YAML file, or the name of a shipped recipe (`smollm2_135m_alpaca_cpu`, with or without
            `.yaml`).

    Returns:
        The path of the file to read.

    Raises:
        FileNotFoundError: neither a file nor a shipped name; the message lists the shipped names.
    """
    if Path(value).is_file():
        return value
    shipped = _shipped(value)
    if shipped is not None:
        return str(shipped)
    names = ", ".join(name for name in recipe_names() if not name.startswith(f"{ACCELERATE}/"))
    hint = f" Did you mean {close!r}?" if (close := closest_name(value)) else ""
    raise FileNotFoundError(
        f"--config expects a YAML recipe file or the name of a shipped recipe, got {value!r} (no such file or "
        f"name).{hint} Shipped recipes: {names}; `soft-peft recipes` lists them."
    )


def _summary(path: Path) -> str:
    """The first phrase of a recipe's leading comment (up to its first `: ` or `. `), which may wrap over lines."""
    paragraph = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or (not text and paragraph):
            break
        if text:
            paragraph.append(text)
    return re.split(r"[:.](?: |$)", " ".join(paragraph), maxsplit=1)[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soft-peft recipes",
        description="List, locate and copy the training recipes and accelerate configs that ship with soft-peft.",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("list", help="List the shipped recipes and accelerate configs (the default).")
    path = commands.add_parser("path", help="Print the path of a shipped file, e.g. for `accelerate --config_file`.")
    path.add_argument("name", help="A recipe name (`smollm2_135m_alpaca_cpu`) or `accelerate/<name>`.")
    copy = commands.add_parser("copy", help="Copy a shipped file to edit it.")
    copy.add_argument("name", help="A recipe name (`smollm2_135m_alpaca_cpu`) or `accelerate/<name>`.")
    copy.add_argument("dest", nargs="?", help="Target file or folder (default: ./<name>.yaml).")
    copy.add_argument("--force", action="store_true", help="Overwrite an existing target file.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `soft-peft recipes` with `argv` (default `sys.argv[1:]`); returns the exit code (2 for user errors)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in (None, "list"):
        names = recipe_names()
        width = max(len(name) for name in names)
        for name in names:
            print(f"{name:<{width}}  {_summary(recipes_dir() / f'{name}.yaml')}")
        print(f"\n{len(names)} files in {recipes_dir()}")
        return 0
    source = _shipped(args.name)
    if source is None:
        hint = f" did you mean {close!r}?" if (close := closest_name(args.name)) else ""
        message = f"soft-peft recipes: no shipped recipe {args.name!r};{hint} `soft-peft recipes` lists them."
        print(message, file=sys.stderr)
        return 2
    if args.command == "path":
        print(source)
        return 0
    target = Path(args.dest) if args.dest else Path(source.name)
    # `dest/` names a folder even before it exists (Path drops the slash): never write a file called `dest`
    if target.is_dir() or (args.dest and args.dest.endswith(("/", os.sep))):
        target = target / source.name
    if target.exists() and not args.force:
        print(f"soft-peft recipes: {target} exists; pass --force to overwrite it.", file=sys.stderr)
        return 2
    if not target.parent.is_dir():
        print(f"soft-peft recipes: no folder {target.parent} to copy into; create it first.", file=sys.stderr)
        return 2
    try:
        shutil.copyfile(source, target)
    except OSError as error:
        print(f"soft-peft recipes: cannot write {target}: {error.strerror}.", file=sys.stderr)
        return 2
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
