"""Datasets of the paper (Alpaca, GSM8K, TriviaQA) as TRL prompt-completion datasets, from the Hub or local files.

Every loader takes a Hub name or a local JSON/JSONL path, so it works on machines without Hub access. Only the
completion is trained (TRL's completion-only loss on prompt-completion data).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from datasets import Dataset, load_dataset

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


def load_raw_dataset(name_or_path: str, split: str = "train", config_name: str | None = None) -> Dataset:
    """Load a Hub dataset by name, or a local JSON/JSONL/Parquet/CSV file or folder.

    Raises:
        DatasetFormatError: for a path that does not exist, or an empty dataset.
    """
    looks_local = os.path.sep in name_or_path or name_or_path.endswith((".json", ".jsonl", ".parquet", ".csv"))
    if os.path.isfile(name_or_path):
        suffix = os.path.splitext(name_or_path)[1].lower()
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if not open(name_or_path, "rb").read(4096).strip():
            raise DatasetFormatError(f"{name_or_path}: the dataset file is empty.")
        if builder is None:
            raise DatasetFormatError(
                f"{name_or_path}: unsupported file type {suffix!r}; use JSON, JSONL, Parquet or CSV."
            )
        dataset = load_dataset(builder, data_files=name_or_path, split="train")
    elif looks_local and not os.path.exists(name_or_path):
        raise DatasetFormatError(f"{name_or_path}: no such dataset file or folder.")
    else:
        dataset = load_dataset(name_or_path, config_name, split=split)
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


_CONVERTERS = {
    "alpaca": alpaca_to_prompt_completion,
    "gsm8k": gsm8k_to_prompt_completion,
    "triviaqa": triviaqa_to_prompt_completion,
}


def load_prompt_completion(
    name_or_path: str, dataset_format: str, split: str = "train", config_name: str | None = None
) -> Dataset:
    """Load ``name_or_path`` and convert it from ``dataset_format`` (``alpaca``, ``gsm8k`` or ``triviaqa``)."""
    if dataset_format not in _CONVERTERS:
        raise DatasetFormatError(f"Unknown dataset format {dataset_format!r}; expected one of {sorted(_CONVERTERS)}.")
    raw = load_raw_dataset(name_or_path, split=split, config_name=config_name)
    return _CONVERTERS[dataset_format](raw, source=name_or_path)


def held_out_split(dataset: Dataset, test_size: int | float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic train / held-out split (``datasets.train_test_split`` with a fixed seed)."""
    parts = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
