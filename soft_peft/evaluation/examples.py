"""Evaluation examples: rows of any dataset format training takes, tokenized into prompt and completion ids.

Datasets are loaded and converted by [`~soft_peft.data.load_trl_dataset`], the loader training uses, with the same
format vocabulary (``messages``, ``prompt_completion``, ``text``, ``alpaca``, ``gsm8k``, ``triviaqa`` or ``auto``).
Prompt and completion are split the way TRL's ``SFTTrainer`` splits them: ``prompt + completion`` is tokenized whole
and the completion starts where the prompt's own tokens diverge from it, so the model is scored in the context it was
trained in.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from ..data import load_trl_dataset
from ..data_rows import DatasetFormatError

__all__ = ["EvalExample", "load_eval_dataset", "tokenize_examples"]


@dataclass
class EvalExample:
    """One tokenized evaluation example.

    Attributes:
        prompt_ids: Context tokens (empty for ``text`` data).
        completion_ids: Scored tokens, ending with EOS.
        prompt: The prompt as text (what generation is conditioned on).
        reference: The reference completion as text (without EOS).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt: str
    reference: str


def load_eval_dataset(
    name_or_path: str,
    max_samples: int | None = None,
    split: str = "train",
    config_name: str | None = None,
    dataset_format: str = "auto",
) -> tuple[Dataset, str]:
    """Load a dataset (local JSON/JSONL/Parquet/CSV or Hub name) as training loads it, keeping the first rows.

    Args:
        name_or_path: Dataset file, folder or Hub name.
        max_samples: Keep only the first ``max_samples`` rows (after conversion).
        split, config_name: Hub split and configuration.
        dataset_format: One of [`~soft_peft.data.DATASET_FORMATS`]; ``"auto"`` tells it by the columns.

    Returns:
        ``(dataset, format)``: the dataset in a TRL format (``messages``, ``prompt``/``completion`` or ``text``) and
        the source format.

    Raises:
        DatasetFormatError: for a missing file, an empty dataset, unknown columns or ``max_samples < 1``.
    """
    if max_samples is not None and max_samples < 1:
        raise DatasetFormatError(f"--max_samples must be >= 1, got {max_samples}.")  # before any loading
    dataset, dataset_format = load_trl_dataset(name_or_path, dataset_format, split=split, config_name=config_name)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, dataset_format


def _render(tokenizer, row: dict, dataset_format: str) -> tuple[str, str, str, bool]:
    """``(prompt, prompt + completion, reference, is_chat)``, rendered as the trainer renders them."""
    if dataset_format == "messages" or (dataset_format != "text" and not isinstance(row.get("prompt"), str)):
        messages = row["messages"] if "messages" in row and row["messages"] is not None else None
        if messages is None:
            prompt_messages, completion_messages = list(row["prompt"]), list(row["completion"])
        else:
            if not messages or messages[-1].get("role") != "assistant":
                raise DatasetFormatError("A 'messages' row must end with an assistant message, the scored completion.")
            prompt_messages, completion_messages = list(messages[:-1]), [messages[-1]]
        if getattr(tokenizer, "chat_template", None) is None:
            raise DatasetFormatError(
                "Conversational data needs a tokenizer with a chat template; this tokenizer has none. Set one "
                "(`tokenizer.chat_template = ...`) or convert the data to 'prompt'/'completion' strings."
            )
        prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt_messages + completion_messages, tokenize=False)
        reference = " ".join(str(m.get("content", "")) for m in completion_messages)
        return prompt, full, reference, True
    if dataset_format == "text":
        return "", row["text"], row["text"], False
    return row["prompt"], row["prompt"] + row["completion"], row["completion"], False


def tokenize_examples(dataset: Dataset, tokenizer, dataset_format: str, max_length: int | None = None) -> list:
    """Tokenize every row into an [`EvalExample`].

    Args:
        dataset: Output of [`load_eval_dataset`].
        tokenizer: The model's tokenizer (needs ``eos_token_id``).
        dataset_format: The detected format.
        max_length: Truncate prompt + completion to this many tokens (from the right), as training does.

    Returns:
        A list of [`EvalExample`], one per row with at least one scored token.

    Raises:
        DatasetFormatError: when the dataset is empty or no row keeps a scored token.
    """
    if len(dataset) == 0:
        raise DatasetFormatError("The evaluation dataset is empty.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token_id; set `tokenizer.eos_token` so completions can end.")
    examples = []
    for row in dataset:
        prompt, full, reference, is_chat = _render(tokenizer, row, dataset_format)
        # Chat templates already add special tokens; plain text gets the tokenizer's defaults, as in TRL
        full_ids = tokenizer(full, add_special_tokens=not is_chat)["input_ids"]
        prompt_ids = tokenizer(prompt, add_special_tokens=not is_chat)["input_ids"] if prompt else []
        start = 0
        while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
            start += 1
        if not full_ids or full_ids[-1] != tokenizer.eos_token_id:
            full_ids = full_ids + [tokenizer.eos_token_id]
        if max_length is not None:
            full_ids = full_ids[:max_length]
        # With no prompt, the first token has no context and is not scored
        start = max(start, 1) if dataset_format == "text" else start
        if start >= len(full_ids):
            continue
        examples.append(EvalExample(full_ids[:start], full_ids[start:], prompt, reference))
    if not examples:
        raise DatasetFormatError(
            "No example has a completion token left to score (all were empty or truncated away); "
            "check the dataset's completions or raise --max_length."
        )
    return examples
