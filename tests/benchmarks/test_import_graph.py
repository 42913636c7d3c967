"""`benchmarks/`: imports run one way. No benchmark module imports one that imports it back, directly or through
others, counting the imports inside functions (a circle that only lazy imports hide is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark_imports(source: str) -> set[str]:
    """The ``benchmarks`` modules one module's source imports, anywhere in it: ``{"common", "decode_harness"}``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("benchmarks.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
            found.add(node.module.split(".")[1])
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle of the import graph once, as the modules along it from its smallest name: ``[["a", "b", "a"]]``."""
    cycles = set()

    def walk(path: list[str]) -> None:
        for imported in sorted(graph.get(path[-1], ())):
            if imported == path[0]:
                cycles.add(tuple([*path, imported]))
            elif imported not in path and imported > path[0]:  # each circle found from its smallest module only
                walk([*path, imported])

    for start in sorted(graph):
        walk([start])
    return [list(cycle) for cycle in sorted(cycles)]


def test_the_cycle_finder_finds_direct_and_longer_circles_and_nothing_else():
    assert import_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_found_at_module_level_and_inside_functions():
    source = (
        "from benchmarks.common import x\nimport benchmarks.quality_plots\nfrom benchmarks import decode_harness\n"
        "def f():\n    from benchmarks.decode_cost import y\n"
    )
    assert benchmark_imports(source) == {"common", "quality_plots", "decode_harness", "decode_cost"}


def test_no_benchmark_module_imports_one_that_imports_it_back():
    graph = {path.stem: benchmark_imports(path.read_text()) for path in sorted(BENCHMARKS.glob("*.py"))}
    assert graph["decode_cost"] >= {"decode_ceiling", "decode_draft_model", "decode_harness"}  # the graph was read
    assert import_cycles(graph) == []
