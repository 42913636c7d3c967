"""Checks of a local JSON, JSON Lines or CSV data file whose faults `datasets` reports as a traceback that names
neither the file nor the line: bytes that are not UTF-8, and a file without a single row.

pyarrow loads a non-UTF-8 string without complaint and fails only when the row is read, inside tokenization after the
model has loaded; a file without rows (a header-only CSV, ``[]``, rows that are all ``{}``) ends in ``Instruction
"train" corresponds to no data!``.
"""

from __future__ import annotations

import json

from .data_rows import DatasetFormatError

__all__ = ["check_utf8", "no_rows_reason"]


def check_utf8(path: str) -> None:
    """Refuse a text data file with bytes that are not UTF-8, naming the first line that holds one.

    Args:
        path: A local JSON, JSON Lines or CSV file.

    Raises:
        DatasetFormatError: naming the file, the line (counted from 1) and the byte.
    """
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DatasetFormatError(
                    f"{path}, line {number}: not UTF-8 text (byte {line[error.start]:#04x} at byte {error.start + 1} "
                    "of the line). Save the file as UTF-8 (from Latin-1: `iconv -f latin1 -t utf-8 IN > OUT`)."
                ) from None


def _json_rows(text: str) -> list | None:
    """The rows of a JSON document (a list) or of JSON Lines; ``None`` when they cannot be told apart so simply."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    # A single object is one JSON Lines row, or a table of columns: left to `datasets`
    return document if isinstance(document, list) else None


def no_rows_reason(path: str, builder: str) -> str | None:
    """Why a JSON, JSON Lines or CSV file holds no row, or ``None`` when it does hold some.

    Args:
        path: A local UTF-8 file (see [`check_utf8`]).
        builder: Its `datasets` builder, ``"json"`` or ``"csv"``.
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if builder == "csv":
        lines = [line for line in text.splitlines() if line.strip()]
        return "the CSV has only its header line" if len(lines) <= 1 else None
    rows = _json_rows(text)
    if rows == []:
        return "the JSON list is empty"
    if rows and all(row == {} for row in rows):
        return f"each of its {len(rows)} rows is an empty object {{}}" if len(rows) > 1 else "its one row is {}"
    return None
