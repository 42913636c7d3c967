"""The repository speaks only of itself: no absolute path of a development machine, no call syntax of a
remote-execution tool, no data default in a folder beside the repository, and no link to a file it does not have.
Every text file the repository holds is read: git's tracked and not-ignored files in a clone, every file in an
sdist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "runs", ".gpu_wheels"}

# What a file may not say, with why. Patterns are split so that this file does not match itself.
FORBIDDEN = {
    "an absolute path of a development machine": re.compile(
        r"(?<![\w.~])/(?:wor" + r"k|roo" + r"t|hom" + r"e/\w+|User" + r"s/\w+)/|[A-Z]:\\\\Users\\\\"
    ),
    "a remote-execution tool's call syntax": re.compile(r"\bru" + r"n\(command=|\bcar" + r"ry=\["),
    # A data folder beside the repository, as a relative path or as path parts (`ROOT.parent / ...`)
    "a folder outside the repository": re.compile(r"\.\./sha" + r"red\b|\.parent / \"sha" + r"red\""),
    "a notes file the repository does not have": re.compile(r"\bNOT" + r"ES(?:\.md)?\b"),
}


def repository_files() -> list[Path]:
    """The repository's files: git's view in a clone (tracked plus untracked, not ignored), else the folder tree."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        files = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist: no git
        files = [p for p in ROOT.rglob("*") if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    return [path for path in files if path.is_file()]


def text_files() -> dict[str, str]:
    texts = {}
    for path in repository_files():
        try:
            texts[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images and other binary files
            continue
    return texts


TEXTS = text_files()


def test_the_scan_sees_the_repository():
    assert {"README.md", "pyproject.toml", "soft_peft/__init__.py", "benchmarks/gpu_check.sh"} <= set(TEXTS)


@pytest.mark.parametrize("what", FORBIDDEN)
def test_no_file_says(what):
    own = Path(__file__).relative_to(ROOT).as_posix()
    hits = [
        f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r}"
        for name, text in TEXTS.items()
        if name != own
        for match in FORBIDDEN[what].finditer(text)
    ]
    assert hits == [], f"{what} in: {hits}"


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("data = '/wor" + "k/shared/data/x.jsonl'", "an absolute path of a development machine"),
        ("see /roo" + "t/.cache/soft_peft", "an absolute path of a development machine"),
        ("ru" + 'n(command="bash x.sh", car' + 'ry=[".w"])', "a remote-execution tool's call syntax"),
        ("default: ../sha" + "red/data/gsm8k", "a folder outside the repository"),
        ('GSM8K = ROOT.parent / "sha' + 'red" / "data"', "a folder outside the repository"),
        ("measured in NOT" + "ES.md", "a notes file the repository does not have"),
    ],
)
def test_each_pattern_catches_what_it_names(text, what):
    assert FORBIDDEN[what].search(text)


@pytest.mark.parametrize("text", ["~/.cache/soft_peft/runs", "/tmp/soft_peft_bench", "recipes/accelerate/zero3.yaml"])
def test_portable_paths_pass(text):
    assert not any(pattern.search(text) for pattern in FORBIDDEN.values())


# A relative Markdown link target: not a URL, not an anchor; the part before any '#'
MARKDOWN_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)]*)?\)")


def test_markdown_links_name_files_the_repository_has():
    missing = [
        f"{name}: {target}"
        for name, text in TEXTS.items()
        if name.endswith(".md")
        for target in MARKDOWN_LINK.findall(text)
        if not ((ROOT / name).parent / target).exists()
    ]
    assert missing == []
