"""Datasets of the paper (Alpaca, GSM8K, TriviaQA) as TRL prompt-completion datasets, from the Hub or local files.

Every loader takes a Hub name or a local JSON/JSONL path, so it works on machines without Hub access. Only the
completion is trained (TRL's completion-only loss on prompt-completion data).
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

from .hub import looks_like_hub_id

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "DatasetFormatError",
    "alpaca_to_prompt_completion",
    "gsm8k_answer",
    "gsm8k_to_prompt_completion",
    "held_out_split",
    "load_raw_dataset",
    "load_prompt_completion",
    "triviaqa_to_prompt_completion",
]

# The Stanford Alpaca prompt templates (tatsu-lab/stanford_alpaca, train.py)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The prompt ends on "Answer:" and the completion starts with the space: a trailing space would be a token of its own
# at inference but merge into the answer's first token in training (TRL warns that the prompt tokens then differ)
GSM8K_PROMPT = "Question: {question}\nAnswer:"
TRIVIAQA_PROMPT = "Question: {question}\nAnswer:"
ANSWER_SEPARATOR = " "

_GSM8K_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetFormatError(ValueError):
    """A dataset is missing, empty, or lacks the columns a format needs."""


def _require_columns(dataset: Dataset, columns: Sequence[str], name: str, source: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DatasetFormatError(
            f"{source}: a {name} dataset needs columns {list(columns)}, but {missing} are missing "
            f"(found {dataset.column_names})."
        )
    if len(dataset) == 0:
        raise DatasetFormatError(f"{source}: the dataset is empty.")


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
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except DatasetGenerationError as error:
        # pyarrow names neither the file nor the line of a syntax error: find it
        location = _first_json_error(path) if builder == "json" else None
        if location is None:
            raise
        raise DatasetFormatError(f"{path}, {location}. Fix that line (JSONL: one JSON object per line).") from error


def _load_hub_dataset(name: str, config_name: str | None, split: str) -> Dataset:
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except ConnectionError as error:  # datasets' "Couldn't reach ... on the Hub", offline mode included
        local = "a local JSON/JSONL file (e.g. --dataset_name data/gsm8k/train_300.jsonl)"
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
            JSON (naming the file and line), or an empty dataset.
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
        extra = (row.get("input") or "").strip()
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        return {
            "prompt": template.format(instruction=row["instruction"].strip(), input=extra),
            "completion": row["output"],
        }

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
            "prompt": GSM8K_PROMPT.format(question=row["question"].strip()),
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
            "prompt": TRIVIAQA_PROMPT.format(question=row["question"].strip()),
            "completion": ANSWER_SEPARATOR + str(answer).lstrip(),
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


_COMPLETION_COLUMNS = {"alpaca": "output", "gsm8k": "answer", "triviaqa": "answer"}
_CONVERTERS = {
    "alpaca": alpaca_to_prompt_completion,
    "gsm8k": gsm8k_to_prompt_completion,
    "triviaqa": triviaqa_to_prompt_completion,
}


def load_prompt_completion(
    name_or_path: str, dataset_format: str, split: str = "train", config_name: str | None = None
) -> Dataset:
    """Load ``name_or_path`` and convert it from ``dataset_format`` (``alpaca``, ``gsm8k`` or ``triviaqa``).

    Args:
        name_or_path: A local file or folder, or a Hub dataset id (see [`load_raw_dataset`]).
        dataset_format: How rows become prompt-completion pairs.
        split, config_name: The Hub split and configuration.

    Returns:
        A TRL prompt-completion dataset (``prompt`` and ``completion`` strings).

    Raises:
        DatasetFormatError: as [`load_raw_dataset`], for missing columns, or when every completion is empty
            (training would only teach the model to stop). Some empty completions only warn.
    """
    if dataset_format not in _CONVERTERS:
        raise DatasetFormatError(f"Unknown dataset format {dataset_format!r}; expected one of {sorted(_CONVERTERS)}.")
    raw = load_raw_dataset(name_or_path, split=split, config_name=config_name)
    converted = _CONVERTERS[dataset_format](raw, source=name_or_path)
    empty = sum(not completion.strip() for completion in converted["completion"])
    column = _COMPLETION_COLUMNS[dataset_format]
    if empty == len(converted):
        raise DatasetFormatError(
            f"{name_or_path}: all {empty} completions (column {column!r}) are empty, so training would only teach "
            f"the end-of-sequence token. Check that the {dataset_format} rows carry their {column!r} text."
        )
    if empty:
        warnings.warn(
            f"{name_or_path}: {empty} of {len(converted)} completions (column {column!r}) are empty; those rows only "
            "train the end-of-sequence token.",
            stacklevel=2,
        )
    return converted


def held_out_split(dataset: Dataset, test_size: int | float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic train / held-out split (``datasets.train_test_split`` with a fixed seed)."""
    parts = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
