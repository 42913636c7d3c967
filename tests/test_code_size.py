"""Functions in `soft_peft/` stay short enough to read in one screen: at most 70 lines of code (docstring, comments
and blank lines aside), unless the function says why in a comment that starts with ``# Long:``."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "soft_peft"
MAX_CODE_LINES = 70


def code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines holding code in the function's body: the docstring, blank lines and comment-only lines do not count."""
    body = function.body
    if ast.get_docstring(function, clean=False) is not None:
        body = body[1:]
    lines = {
        number
        for statement in body
        for number in range(statement.lineno, statement.end_lineno + 1)
        if source[number - 1].strip() and not source[number - 1].strip().startswith("#")
    }
    return len(lines)


def long_functions(root: Path) -> list[str]:
    """``path:line name (N lines)`` for each function over the limit that gives no ``# Long:`` reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            count = code_lines(node, source)
            text = source[node.lineno - 1 : node.end_lineno]
            if count > MAX_CODE_LINES and not any(line.strip().startswith("# Long:") for line in text):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({count} lines)")
    return found


def test_code_lines_leave_out_docstring_comments_and_blank_lines():
    source = 'def f():\n    """Doc.\n\n    More."""\n    # why\n    x = 1\n\n    return (\n        x\n    )\n'
    function = ast.parse(source).body[0]
    assert code_lines(function, source.splitlines()) == 4


def test_a_long_function_is_found_unless_it_says_why(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_CODE_LINES + 1))
    (package / "a.py").write_text(f"def long():\n{body}\n\ndef short():\n    return 1\n")
    assert long_functions(package) == [f"pkg/a.py:1 long ({MAX_CODE_LINES + 1} lines)"]
    (package / "a.py").write_text(f"def long():\n    # Long: one table, read top to bottom\n{body}")
    assert long_functions(package) == []


def test_no_function_in_the_package_is_too_long_without_a_reason():
    assert long_functions(PACKAGE) == []
