"""What `import soft_peft` costs and exposes: a small top level loaded lazily, no evaluation or plotting at import, and
one import path per name."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys

import pytest

import soft_peft
import soft_peft.evaluation


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_loads_neither_evaluation_nor_matplotlib():
    loaded = _run(
        "import sys, soft_peft; "
        "print(sorted(m for m in ('soft_peft.evaluation', 'matplotlib', 'soft_peft.data') if m in sys.modules))"
    )
    assert loaded == "[]"


# The public top level: the training API, the three ways to run a SoFT model, and the exits a checkpoint records
TOP_LEVEL = {
    "SoFTConfig": "soft_peft.config",
    "SoFTSettings": "soft_peft.settings",
    "SoFTTrainer": "soft_peft.trainer",
    "SortedExitOutput": "soft_peft.exit_forward",
    "SortedLossWrapper": "soft_peft.wrapper",
    "add_sorted_exit_loss": "soft_peft.wrapper",
    "dynamic_generate": "soft_peft.inference.dynamic",
    "extract_submodel": "soft_peft.inference.submodel",
    "recorded_exit_layers": "soft_peft.exits",
    "self_speculative_generate": "soft_peft.inference.speculative",
}


def test_the_top_level_is_exactly_the_intended_names_each_from_its_defining_module():
    assert soft_peft.__all__ == sorted([*TOP_LEVEL, "__version__"])
    assert len(soft_peft.__all__) <= 12
    for name, module in TOP_LEVEL.items():
        value = getattr(soft_peft, name)
        assert value.__module__ == module, name
        assert value is getattr(importlib.import_module(module), name)
    assert isinstance(soft_peft.__version__, str) and soft_peft.__version__[0].isdigit()


def _all_modules() -> list[str]:
    """The package and every module in it (``__main__`` aside: importing it runs the command)."""
    found = [info.name for info in pkgutil.walk_packages(soft_peft.__path__, "soft_peft.")]
    return ["soft_peft", *(name for name in found if not name.endswith(".__main__"))]


ALL_MODULES = _all_modules()
# Each subcommand module exposes `main(argv)`, the protocol `soft-peft <name>` calls: one name, several commands
CLI_MAIN = "main"


def test_the_walk_finds_the_package_and_its_subpackages_modules():
    assert {"soft_peft", "soft_peft.config", "soft_peft.inference.vocab", "soft_peft.evaluation.judge"} <= set(
        ALL_MODULES
    )
    assert "soft_peft.cli.__main__" not in ALL_MODULES


@pytest.mark.parametrize("module_name", ALL_MODULES[1:])
def test_a_module_exports_only_what_it_defines(module_name):
    module = importlib.import_module(module_name)
    assert isinstance(module.__all__, list), f"{module_name} declares no __all__"
    for name in module.__all__:
        value = getattr(module, name)
        # A type alias of a builtin (`Verdict = str`) names a type, not a re-export
        if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ != "builtins":
            assert value.__module__ == module.__name__, f"{module.__name__} re-exports {name} of {value.__module__}"


def owners_of_public_names(modules: list[str]) -> dict[str, list[str]]:
    """Each name in some module's ``__all__``, and the modules whose ``__all__`` holds it."""
    owners = {}
    for module_name in modules:
        for name in importlib.import_module(module_name).__all__:
            owners.setdefault(name, []).append(module_name)
    return owners


def test_each_public_name_is_in_exactly_one_modules_all():
    owners = owners_of_public_names(ALL_MODULES)
    twice = {name: where for name, where in owners.items() if len(where) > 1 and name != CLI_MAIN}
    assert twice == {}
    assert all(module.startswith("soft_peft.cli") for module in owners[CLI_MAIN])
    # The top level is its names' one path: their defining modules leave them out
    assert {owners[name][0] for name in TOP_LEVEL} == {"soft_peft"}


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        soft_peft.not_a_name  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        soft_peft.evaluation.not_a_name  # noqa: B018
    # Names that live in their modules are not reachable from the top level
    for name in ("sorted_exit_loss", "ExitSchedule", "find_exit_head", "frequent_token_ids", "run_evaluation"):
        with pytest.raises(AttributeError):
            getattr(soft_peft, name)


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    path = tmp_path / "curves.png"
    backend = _run(
        "import matplotlib; matplotlib.use('svg'); "
        "from soft_peft.evaluation.report import plot_exit_curves, plot_similarity; "
        f"plot_exit_curves({{'a': {{1: {{'loss': 2.0}}, 2: {{'loss': 1.0}}}}}}, {str(path)!r}); "
        f"plot_similarity({{('a', 'a'): ([[1.0, 0.5], [0.5, 1.0]], [1, 2], [1, 2])}}, 'cosine', {str(path)!r}); "
        "print(matplotlib.get_backend())"
    )
    assert backend == "svg"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_and_the_cli_help_and_version_load_neither_torch_nor_transformers():
    loaded = _run(
        "import sys, contextlib, io, soft_peft; from soft_peft.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = main(['--help']), main(['--version'])\n"
        "print(codes, sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    assert loaded == "(0, 0) []"


def test_subpackages_are_attributes_of_the_lazy_package():
    # A fresh interpreter: `import soft_peft` alone, then subpackages reached as attributes, as an eager package gave
    code = (
        "import sys, soft_peft\n"
        "assert 'soft_peft.inference' not in sys.modules\n"
        "print(soft_peft.inference.__name__, soft_peft.layer_dropout.LayerDropout.__name__)\n"
        "try:\n    soft_peft.not_a_module\nexcept AttributeError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [
        "soft_peft.inference LayerDropout",
        "module 'soft_peft' has no attribute 'not_a_module'",
    ]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `soft_peft.schedule.ExitSchedule`: its parent is a module, not a package
        return False


def test_the_guides_api_table_names_what_each_module_exports():
    """docs/guide.md's "Public API" table: every name it lists is exported where the row says it lives."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    table = text.split("| name | what it is |", 1)[1].split("\n\n", 1)[0]
    checked = 0
    for row in table.splitlines()[2:]:
        first, second = row.split(" | ")[:2]
        names = re.findall(r"`([\w.]+)", first)
        if not names or not names[0].startswith("soft_peft"):  # the top level, or the `soft-peft` command
            where, listed = soft_peft, [n for n in names if n != "soft"]
        elif _is_module(names[0]):  # a module: the names its row lists
            where, listed = importlib.import_module(names[0]), re.findall(r"`(\w+)[`(]", second)
        else:  # `soft_peft.module.name`
            module, name = names[0].rsplit(".", 1)
            where, listed = importlib.import_module(module), [name]
        for name in listed:
            assert name in where.__all__, (
                f"docs/guide.md lists {name} under {where.__name__}, which does not export it"
            )
            checked += 1
    assert checked >= 20
