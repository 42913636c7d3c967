"""Checks of a dataset's rows before anything is tokenized: one format per dataset, every field of the type its
format needs, and every conversation with messages that have a role. A null or a number where TRL expects text
otherwise fails inside tokenization, after the model has loaded, without naming the row; an empty conversation fails
there too, and messages without a role come out as rows "longer than --max_length".
"""

from __future__ import annotations

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

__all__ = ["DatasetFormatError", "check_messages", "check_one_format_per_row", "check_row_types"]


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
# The columns that may hold conversations (lists of messages), and whether such a list may be empty there
_CONVERSATION_COLUMNS = {"messages": {"messages": False}, "prompt_completion": {"prompt": True, "completion": True}}


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


def _every_message_has_a_role(column: pa.ChunkedArray, may_be_empty: bool) -> bool:
    """Whether a column of lists of records is sure to pass [`check_messages`], told by arrow without a row in Python.

    ``False`` also when it cannot tell (JSON-typed or mixed columns): the rows are then looked at one by one.
    """
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return False
    if kind.value_type.get_field_index("role") < 0 or column.null_count:
        return False
    if not may_be_empty and pc.min(pc.list_value_length(column)).as_py() == 0:
        return False
    return pc.struct_field(pc.list_flatten(column), "role").null_count == 0


def _conversation_fault(conversation, may_be_empty: bool) -> str | None:
    if not isinstance(conversation, list):
        return None  # a prompt or completion string; its type was checked by `check_row_types`
    if not conversation and not may_be_empty:
        return "is an empty list: a conversation needs at least one message"
    for number, message in enumerate(conversation, 1):
        if not isinstance(message, dict):
            return f"has message {number} {message!r} (of type {type(message).__name__}), not a record"
        if not isinstance(message.get("role"), str):
            # arrow gives every message all the keys of the column, a missing one as null: show the others
            keys = sorted(key for key, value in message.items() if value is not None and key != "role")
            return f"has message {number} without a 'role' (it has {keys})"
    return None


def check_messages(dataset: Dataset, dataset_format: str, source: str) -> None:
    """Refuse the first conversation that is empty or has a message without a ``role``, naming the row and message.

    Args:
        dataset: The raw rows, after [`check_row_types`].
        dataset_format: Their resolved format: ``messages``, or ``prompt_completion`` (whose prompt and completion
            may be conversations); other formats have none.
        source: The dataset's name, for the message.

    Raises:
        DatasetFormatError: naming the file, the row (counted from 1), the column and the message (counted from 1).
    """
    for column, may_be_empty in _CONVERSATION_COLUMNS.get(dataset_format, {}).items():
        if column not in dataset.column_names or _every_message_has_a_role(dataset.data.column(column), may_be_empty):
            continue
        for index, conversation in enumerate(dataset[column]):
            fault = _conversation_fault(conversation, may_be_empty)
            if fault is not None:
                raise DatasetFormatError(
                    f"{source}, row {index + 1}: {column!r} {fault}. Each message needs a 'role' (system, user or "
                    "assistant) and its 'content' (rename ShareGPT's 'from'/'value' to them). Fix or remove that row."
                )
