"""What `import soft_peft` costs and exposes: no evaluation or plotting at import, deprecated names still resolve."""

from __future__ import annotations

import subprocess
import sys
import warnings

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


def test_top_level_all_is_sorted_and_importable():
    assert soft_peft.__all__ == sorted(soft_peft.__all__)
    for name in soft_peft.__all__:
        assert getattr(soft_peft, name) is not None
    assert soft_peft.evaluation.__all__ == sorted(soft_peft.evaluation.__all__)
    for name in soft_peft.evaluation.__all__:
        assert getattr(soft_peft.evaluation, name) is not None


@pytest.mark.parametrize("name", ["EvalSettings", "evaluate_exits", "judge_pairwise", "run_evaluation"])
def test_moved_top_level_names_warn_and_resolve(name):
    with pytest.warns(FutureWarning, match=f"soft_peft.evaluation import {name}"):
        value = getattr(soft_peft, name)
    assert value is getattr(soft_peft.evaluation, name)


@pytest.mark.parametrize(
    ("name", "module"), [("every_fourth_layer", "pipeline"), ("token_f1", "metrics"), ("JUDGE_PROMPT", "judge")]
)
def test_moved_evaluation_names_warn_and_resolve(name, module):
    with pytest.warns(FutureWarning, match=f"soft_peft.evaluation.{module}"):
        value = getattr(soft_peft.evaluation, name)
    assert value is getattr(getattr(soft_peft.evaluation, module), name)


def test_unknown_names_still_raise_attribute_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError):
            soft_peft.not_a_name  # noqa: B018
        with pytest.raises(AttributeError):
            soft_peft.evaluation.not_a_name  # noqa: B018


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


def test_each_top_level_name_loads_from_the_module_that_defines_it():
    import importlib

    assert set(soft_peft.__all__) == set(soft_peft._LAZY) | {"__version__"}
    for name, module in soft_peft._LAZY.items():
        assert getattr(soft_peft, name) is getattr(importlib.import_module(module, "soft_peft"), name)
    assert set(soft_peft.__all__) <= set(dir(soft_peft))


def test_subpackages_are_attributes_of_the_lazy_package():
    # A fresh interpreter: `import soft_peft` alone, then subpackages reached as attributes, as an eager package gave
    code = (
        "import sys, soft_peft\n"
        "assert 'soft_peft.inference' not in sys.modules\n"
        "print(soft_peft.inference.self_speculative_generate.__module__,"
        " soft_peft.layer_dropout.LayerDropout.__name__)\n"
        "try:\n    soft_peft.not_a_module\nexcept AttributeError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [
        "soft_peft.inference.speculative LayerDropout",
        "module 'soft_peft' has no attribute 'not_a_module'",
    ]
