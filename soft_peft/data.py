"""Datasets for training and evaluation alike: one vocabulary of row formats, from the Hub or local files.

Formats ([`DATASET_FORMATS`]): TRL's own dataset types pass through as they are (``messages``, ``prompt_completion``,
``text``); the paper's datasets are converted to prompt-completion with their templates (``alpaca``, ``gsm8k``,
``triviaqa``); ``auto`` tells them apart by their columns ([`detect_format`]). Every loader takes a Hub name or a local
JSON/JSONL/Parquet/CSV path, so it works on machines without Hub access. On prompt-completion data only the completion
is trained (TRL's completion-only loss).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import datasets
import huggingface_hub
from datasets import Dataset
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

from .data_files import check_utf8, no_rows_reason
from .data_rows import DatasetFormatError, check_messages, check_one_format_per_row, check_row_types
from .hub import looks_like_hub_id
from .prompt_templates import (
    ANSWER_SEPARATOR,
    CONVERTED_FORMATS,
    DATASET_FORMATS,
    format_prompt,
)

# DatasetFormatError and DATASET_FORMATS, used here too, are imported from their modules (`soft_peft.data_rows`,
# `soft_peft.prompt_templates`)
__all__ = [
    "alpaca_to_prompt_completion",
    "detect_format",
    "gsm8k_answer",
    "gsm8k_to_prompt_completion",
    "held_out_split",
    "load_prompt_completion",
    "load_raw_dataset",
    "load_trl_dataset",
    "to_trl_format",
    "triviaqa_to_prompt_completion",
]

# DATASET_FORMATS, TRL_FORMATS and CONVERTED_FORMATS live in prompt_templates, which imports nothing heavy
# The columns each TRL type needs (the converters below check their own), and for the empty-completion check the
# column each format's completion comes from
_FORMAT_COLUMNS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
_COMPLETION_COLUMNS = {"prompt_completion": "completion", "alpaca": "output", "gsm8k": "answer", "triviaqa": "answer"}

_GSM8K_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _require_columns(
    dataset: Dataset, columns: Sequence[str], name: str, source: str, suggest_format: bool = False
) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if not missing:
        return
    message = (
        f"{source}: a {name} dataset needs columns {list(columns)}, but {missing} are missing "
        f"(found {dataset.column_names})."
    )
    if suggest_format:  # name the format the columns do match, if any
        try:
            message += f" Its columns are {detect_format(dataset)!r} data: pass that format, or 'auto' to tell it by "
            message += "the columns."
        except DatasetFormatError:
            pass
    raise DatasetFormatError(message)


def _first_json_error(path: str) -> str | None:
    """``"line N: message"`` for the first malformed JSON in a JSON or JSON Lines file; ``None`` if it all parses."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as error:
        document_error = error
    lines = text.splitlines()
    first = next(number for number, line in enumerate(lines, 1) if line.strip())
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as error:
            if number == first:  # not JSON Lines (or its first line is broken): one document
                break
            return f"line {number}: invalid JSON ({error.msg}, column {error.colno})"
    else:
        return None  # every line is valid JSON: the problem is not the syntax
    return f"line {document_error.lineno}: invalid JSON ({document_error.msg}, column {document_error.colno})"


def _load_local_file(path: str) -> Dataset:
    suffix = os.path.splitext(path)[1].lower()
    builder = _LOCAL_BUILDERS.get(suffix)
    if builder is None:
        raise DatasetFormatError(f"{path}: unsupported file type {suffix!r}; use JSON, JSONL, Parquet or CSV.")
    with open(path, "rb") as handle:
        if not handle.read(4096).strip():
            raise DatasetFormatError(f"{path}: the dataset file is empty.")
    if builder != "parquet":
        check_utf8(path)  # before pyarrow, which loads other bytes and fails only when the row is read
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except (DatasetGenerationError, ValueError) as error:
        # pyarrow names neither the file nor the line of a syntax error: find it. datasets 4.x raises the JSON
        # parser's bare ValueError (while it infers the columns), 5.x a DatasetGenerationError; other errors re-raise
        location = _first_json_error(path) if builder == "json" else None
        if location is not None:
            fix = "Fix that line (JSONL: one JSON object per line)."
            raise DatasetFormatError(f"{path}, {location}. {fix}") from error
        # A file without rows fails as `Instruction "train" corresponds to no data!`: say which way it has none
        reason = no_rows_reason(path, builder) if builder != "parquet" else None
        if reason is None:
            raise
        raise DatasetFormatError(f"{path}: the dataset has no rows: {reason}.") from None


def _load_hub_dataset(name: str, config_name: str | None, split: str) -> Dataset:
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except ConnectionError as error:  # datasets' "Couldn't reach ... on the Hub", offline mode included
        # No path of a clone here: a user of the installed package has none of the repository's data/ files
        local = "a local JSON/JSONL file of the same rows (--dataset_name my_data.jsonl)"
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE=1 is set and it is not in the datasets cache"
            fix = f"Work offline with {local}, or load it once online to cache it"
        else:
            reason = str(error)
            fix = f"To work offline, pass {local}, or set HF_HUB_OFFLINE=1 with the dataset already in the cache"
        raise DatasetFormatError(
            f"{name}: no such local file or folder, and the Hub could not be reached ({reason}). {fix}."
        ) from None
    except DatasetNotFoundError:
        raise DatasetFormatError(
            f"{name}: no such local file or folder, and no Hub dataset of that name (check the spelling; a private "
            "or gated dataset needs `hf auth login`)."
        ) from None


def load_raw_dataset(name_or_path: str, split: str = "train", config_name: str | None = None) -> Dataset:
    """Load a local JSON/JSONL/Parquet/CSV file or dataset folder, or else a Hub dataset.

    An existing local file or folder is always loaded locally; any other name that is a valid Hub id goes to
    ``datasets.load_dataset(name_or_path, config_name, split=split)``.

    Args:
        name_or_path: A file, a folder, or a Hub dataset id such as ``openai/gsm8k``.
        split: The split to load (Hub datasets and folders; a single file is always one ``train`` split).
        config_name: The Hub dataset's configuration (e.g. ``"main"`` for ``openai/gsm8k``).

    Returns:
        The rows as a ``datasets.Dataset``.

    Raises:
        DatasetFormatError: one line for a missing path, an unreachable Hub (with how to work offline), malformed
            JSON or bytes that are not UTF-8 (naming the file and line), or a dataset without rows.
    """
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        dataset = _load_local_file(path)
    elif os.path.isdir(path):
        dataset = datasets.load_dataset(path, config_name, split=split)
    elif not looks_like_hub_id(name_or_path) or name_or_path.endswith(tuple(_LOCAL_BUILDERS)):
        raise DatasetFormatError(f"{name_or_path}: no such dataset file or folder.")
    else:
        dataset = _load_hub_dataset(name_or_path, config_name, split)
    if len(dataset) == 0:
        raise DatasetFormatError(f"{name_or_path}: the dataset is empty.")
    return dataset


def alpaca_to_prompt_completion(dataset: Dataset, source: str = "dataset") -> Dataset:
    """Alpaca rows (``instruction``, ``input``, ``output``) to ``prompt``/``completion`` with the Alpaca template."""
    _require_columns(dataset, ("instruction", "output"), "Alpaca", source)

    def convert(row):
        prompt = format_prompt(row["instruction"], "alpaca", context=row.get("input") or "")
        return {"prompt": prompt, "completion": row["output"]}

    return dataset.map(convert, remove_columns=dataset.column_names)


def gsm8k_answer(text: str) -> str | None:
    """The final number after ``####`` in a GSM8K answer (commas removed), or ``None``."""
    match = _GSM8K_ANSWER.search(text or "")
    return None if match is None else match.group(1).replace(",", "").rstrip(".")


def gsm8k_to_prompt_completion(dataset: Dataset, source: str = "dataset") -> Dataset:
    """GSM8K rows (``question``, ``answer``) to ``prompt`` (``"Question: ...\nAnswer:"``) and ``completion`` (a space,
    then the worked answer with its ``#### N`` line)."""
    _require_columns(dataset, ("question", "answer"), "GSM8K", source)
    return dataset.map(
        lambda row: {
            "prompt": format_prompt(row["question"], "gsm8k"),
            "completion": ANSWER_SEPARATOR + row["answer"].lstrip(),
        },
        remove_columns=dataset.column_names,
    )


def triviaqa_to_prompt_completion(dataset: Dataset, source: str = "dataset") -> Dataset:
    """TriviaQA rows (``question``, ``answer`` as a string or a dict with ``value``) to ``prompt``/``completion``,
    split as GSM8K's: the prompt ends on ``"Answer:"`` and the completion starts with a space."""
    _require_columns(dataset, ("question", "answer"), "TriviaQA", source)

    def convert(row):
        answer = row["answer"]
        answer = answer.get("value") if isinstance(answer, dict) else answer
        return {
            "prompt": format_prompt(row["question"], "triviaqa"),
            "completion": ANSWER_SEPARATOR + str(answer).lstrip(),
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


_CONVERTERS = {
    "alpaca": alpaca_to_prompt_completion,
    "gsm8k": gsm8k_to_prompt_completion,
    "triviaqa": triviaqa_to_prompt_completion,
}


def detect_format(dataset: Dataset, source: str = "dataset") -> str:
    """The row format of ``dataset`` told by its columns, one of [`DATASET_FORMATS`] other than ``auto``.

    Checked in this order: ``messages``; ``prompt`` + ``completion``; Alpaca ``instruction`` + ``output`` (before
    ``text``: the Hub's Alpaca also carries its rendered ``text``, and only the response should be trained);
    ``question`` + ``answer`` (``triviaqa`` when the answer is a record with a ``value``, else ``gsm8k``); ``text``.

    Raises:
        DatasetFormatError: when no format's columns are present, listing each format's columns.
    """
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"question", "answer"} <= columns:
        return "triviaqa" if isinstance(dataset.features.get("answer"), dict) else "gsm8k"
    if "text" in columns:
        return "text"
    raise DatasetFormatError(
        f"{source}: cannot tell the dataset format from its columns {sorted(columns)}. Expected one of: "
        "'messages'; 'prompt' + 'completion'; Alpaca 'instruction' + 'output' (+ 'input'); 'question' + 'answer' "
        "(GSM8K, TriviaQA); 'text'. Or pass the format (dataset_format) and rename the columns it needs."
    )


def to_trl_format(dataset: Dataset, dataset_format: str = "auto", source: str = "dataset") -> tuple[Dataset, str]:
    """Bring rows of any format in [`DATASET_FORMATS`] to a TRL dataset type.

    Args:
        dataset: The raw rows.
        dataset_format: Their format, or ``"auto"`` to detect it (see [`detect_format`]).
        source: The dataset's name, for messages.

    Returns:
        ``(dataset, format)``: the paper's formats converted to ``prompt``/``completion``, TRL's types unchanged;
        and the resolved format.

    Raises:
        DatasetFormatError: for an unknown format, missing columns, rows that mix ``messages`` with
            ``prompt``/``completion``, a null or mistyped field or a conversation that is empty or has a message
            without its ``role`` (naming the row, counted from 1), or when every
            completion is empty (training would only teach the model to stop). Some empty completions only warn.
    """
    if dataset_format not in DATASET_FORMATS:
        raise DatasetFormatError(
            f"Unknown dataset format {dataset_format!r}; expected one of {list(DATASET_FORMATS)}."
        )
    check_one_format_per_row(dataset, source)
    if dataset_format == "auto":
        dataset_format = detect_format(dataset, source)
    check_row_types(dataset, dataset_format, source)
    check_messages(dataset, dataset_format, source)
    if dataset_format in _CONVERTERS:  # each converter checks its own columns
        dataset = _CONVERTERS[dataset_format](dataset, source=source)
    else:
        _require_columns(dataset, _FORMAT_COLUMNS[dataset_format], repr(dataset_format), source, suggest_format=True)
    if dataset_format in _COMPLETION_COLUMNS:
        _check_completions(dataset["completion"], _COMPLETION_COLUMNS[dataset_format], dataset_format, source)
    return dataset, dataset_format


def _check_completions(completions: list, column: str, dataset_format: str, source: str) -> None:
    # Conversational completions (lists of messages) are left to TRL's own checks
    empty = sum(isinstance(c, str) and not c.strip() for c in completions)
    if empty == len(completions):
        raise DatasetFormatError(
            f"{source}: all {empty} completions (column {column!r}) are empty, so training would only teach "
            f"the end-of-sequence token. Check that the {dataset_format} rows carry their {column!r} text."
        )
    if empty:
        warnings.warn(
            f"{source}: {empty} of {len(completions)} completions (column {column!r}) are empty; those rows only "
            "train the end-of-sequence token.",
            stacklevel=3,
        )


def load_trl_dataset(
    name_or_path: str, dataset_format: str = "auto", split: str = "train", config_name: str | None = None
) -> tuple[Dataset, str]:
    """Load ``name_or_path`` (see [`load_raw_dataset`]) and bring it to a TRL dataset type (see [`to_trl_format`]).

    Training (``soft-peft train``) and evaluation (``soft-peft eval``) both load their data with it.

    Returns:
        ``(dataset, format)``, the format resolved when ``dataset_format="auto"``.
    """
    raw = load_raw_dataset(name_or_path, split=split, config_name=config_name)
    return to_trl_format(raw, dataset_format, source=name_or_path)


def load_prompt_completion(
    name_or_path: str, dataset_format: str, split: str = "train", config_name: str | None = None
) -> Dataset:
    """Load one of the paper's datasets (``alpaca``, ``gsm8k`` or ``triviaqa``) as ``prompt``/``completion`` strings.

    The same as ``load_trl_dataset(...)[0]`` restricted to the formats that are converted to prompt-completion.

    Raises:
        DatasetFormatError: as [`load_trl_dataset`], and for a format that is not converted.
    """
    if dataset_format not in CONVERTED_FORMATS:
        raise DatasetFormatError(
            f"Unknown dataset format {dataset_format!r} for prompt-completion conversion; expected one of "
            f"{list(CONVERTED_FORMATS)} (load_trl_dataset takes every format)."
        )
    return load_trl_dataset(name_or_path, dataset_format, split, config_name)[0]


def held_out_split(dataset: Dataset, test_size: int | float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic train / held-out split (``datasets.train_test_split`` with a fixed seed)."""
    parts = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
