"""Checks of a dataset's rows before anything is tokenized: one format per dataset, and every field of the type its
format needs. A null or a number where TRL expects text otherwise fails inside tokenization, after the model has
loaded, without naming the row.
"""

from __future__ import annotations

import datasets
from datasets import Dataset

__all__ = ["DatasetFormatError", "check_one_format_per_row", "check_row_types"]


class DatasetFormatError(ValueError):
    """A dataset is missing, empty, or lacks the columns a format needs."""


# What each format's columns hold in every row (a conversational prompt or completion is a list of messages; an
# Alpaca row may have no `input`; a TriviaQA answer may be a record with its `value`): anything else, a null or a
# number, fails only after the model has loaded (inside TRL's tokenization), so it is refused here
_ROW_TYPES = {
    "prompt_completion": {"prompt": (str, list), "completion": (str, list)},
    "messages": {"messages": (list,)},
    "text": {"text": (str,)},
    "alpaca": {"instruction": (str,), "output": (str,), "input": (str, type(None))},
    "gsm8k": {"question": (str,), "answer": (str,)},
    "triviaqa": {"question": (str,), "answer": (str, dict)},
}
_TYPE_NAMES = {str: "string", list: "list of messages", dict: "record", type(None): "null"}


def check_one_format_per_row(dataset: Dataset, source: str) -> None:
    """Refuse rows that mix conversational ``messages`` with ``prompt``/``completion`` rows, naming the first of each.

    Args:
        dataset: The raw rows.
        source: The dataset's name, for the message.

    Raises:
        DatasetFormatError: naming the first row of each kind (counted from 1).

    A JSON file with both kinds of rows loads as one table whose rows lack the other kind's columns (nulls), and
    TRL would fail on the first such row after the model has loaded.
    """
    if "messages" not in dataset.column_names or not {"prompt", "completion"} & set(dataset.column_names):
        return
    pair_columns = [dataset[c] for c in ("prompt", "completion") if c in dataset.column_names]
    chat = pair = None  # the first row of each kind that lacks the other kind's columns
    for index, (messages, *pair_values) in enumerate(zip(dataset["messages"], *pair_columns, strict=True)):
        has_pair = any(value is not None for value in pair_values)
        if messages is not None and not has_pair and chat is None:
            chat = index
        elif messages is None and has_pair and pair is None:
            pair = index
        if chat is not None and pair is not None:
            break
    if chat is None or pair is None:
        return
    kinds = sorted([(chat, "'messages'"), (pair, "'prompt'/'completion'")])
    shown = ", ".join(f"row {index + 1} has {columns}" for index, columns in kinds)
    raise DatasetFormatError(
        f"{source}: rows mix formats: {shown}. Use "
        "one format per dataset: rewrite one kind as the other (a prompt-completion pair is the messages "
        "[user: prompt, assistant: completion]) or split them into two files."
    )


def _feature_kind(feature) -> type | None:
    """The Python type every non-null value of a column with this feature has; ``None`` when it varies (JSON)."""
    if isinstance(feature, datasets.Value):
        return str if feature.dtype in ("string", "large_string") else None
    if isinstance(feature, (list, datasets.List, datasets.LargeList)):
        return list
    return dict if isinstance(feature, dict) else None


def check_row_types(dataset: Dataset, dataset_format: str, source: str) -> None:
    """Refuse the first row whose field is null or of the wrong type (a number for a completion), naming the row.

    Args:
        dataset: The raw rows, before any conversion.
        dataset_format: Their resolved format (not ``auto``).
        source: The dataset's name, for the message.

    Raises:
        DatasetFormatError: naming the file, the row (counted from 1), the column and what it holds.
    """
    for column, allowed in _ROW_TYPES[dataset_format].items():
        if column not in dataset.column_names:
            continue  # a missing required column is reported by the column checks
        kind = _feature_kind(dataset.features[column])
        if kind in allowed and dataset.data.column(column).null_count == 0:
            continue  # the column's type fits and no row is null: nothing to look at row by row
        for index, value in enumerate(dataset[column]):
            if not isinstance(value, allowed):
                shown = "null" if value is None else f"{value!r} (of type {type(value).__name__})"
                expected = " or ".join(_TYPE_NAMES[kind] for kind in allowed)
                raise DatasetFormatError(
                    f"{source}, row {index + 1}: {column!r} is {shown}, but {dataset_format} rows need a {expected} "
                    "there. Fix or remove that row."
                )
