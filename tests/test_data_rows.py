"""[`soft_peft.data_rows`]: one format per dataset, every field of the type its format needs, the row named."""

from __future__ import annotations

import pytest
from datasets import Dataset

from soft_peft.data_rows import DatasetFormatError, check_messages, check_one_format_per_row, check_row_types

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_rows_of_two_formats_are_named_in_row_order():
    rows = Dataset.from_list(
        [{"messages": CHAT, "prompt": None, "completion": None}] * 2
        + [{"messages": None, "prompt": "a", "completion": "b"}]
    )
    with pytest.raises(DatasetFormatError, match="src: rows mix formats: row 1 has 'messages', row 3 has 'prompt'"):
        check_one_format_per_row(rows, "src")


def test_rows_that_carry_both_kinds_are_not_mixed():
    # An extra `prompt` column on every conversational row is one format, not two
    rows = Dataset.from_list([{"messages": CHAT, "prompt": "hi", "completion": None}] * 3)
    check_one_format_per_row(rows, "src")


@pytest.mark.parametrize(
    "rows, dataset_format, message",
    [
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
            "prompt_completion",
            "row 2: 'completion' is null",
        ),
        (
            [{"messages": CHAT}, {"messages": None}],
            "messages",
            "row 2: 'messages' is null, but messages rows need a list",
        ),
        (
            [{"question": "q", "answer": None}],
            "triviaqa",
            "row 1: 'answer' is null, but triviaqa rows need a string or record",
        ),
    ],
)
def test_the_first_bad_row_is_named(rows, dataset_format, message):
    with pytest.raises(DatasetFormatError, match=message):
        check_row_types(Dataset.from_list(rows), dataset_format, "src")


@pytest.mark.parametrize(
    "rows, dataset_format",
    [
        ([{"prompt": "a", "completion": "b"}] * 3, "prompt_completion"),
        ([{"prompt": CHAT[:1], "completion": CHAT[1:]}], "prompt_completion"),  # conversational prompt-completion
        ([{"messages": CHAT}] * 2, "messages"),
        ([{"instruction": "a", "input": None, "output": "b"}], "alpaca"),  # Alpaca rows may lack an input
        ([{"question": "q", "answer": {"value": "a"}}], "triviaqa"),
    ],
)
def test_well_formed_rows_pass(rows, dataset_format):
    check_row_types(Dataset.from_list(rows), dataset_format, "src")


@pytest.mark.parametrize(
    "rows, dataset_format, message",
    [
        ([{"messages": CHAT}, {"messages": []}], "messages", "row 2: 'messages' is an empty list"),
        (
            [{"messages": CHAT}, {"messages": [CHAT[0], {"content": "x"}]}],
            "messages",
            r"row 2: 'messages' has message 2 without a 'role' \(it has \['content'\]\)",
        ),
        (  # ShareGPT's keys: arrow's column has no `role` at all
            [{"messages": [{"from": "human", "value": "hi"}]}],
            "messages",
            r"row 1: 'messages' has message 1 without a 'role' \(it has \['from', 'value'\]\)",
        ),
        (
            [{"prompt": CHAT[:1], "completion": [{"content": "x"}]}],
            "prompt_completion",
            "row 1: 'completion' has message 1 without a 'role'",
        ),
    ],
)
def test_an_empty_conversation_or_a_message_without_a_role_is_named(rows, dataset_format, message):
    with pytest.raises(DatasetFormatError, match=message):
        check_messages(Dataset.from_list(rows), dataset_format, "src")


@pytest.mark.parametrize(
    "rows, dataset_format",
    [
        ([{"messages": CHAT}] * 3, "messages"),
        ([{"prompt": CHAT[:1], "completion": CHAT[1:]}], "prompt_completion"),
        ([{"prompt": [], "completion": CHAT[1:]}], "prompt_completion"),  # an empty conversational prompt is TRL's
        ([{"prompt": "a", "completion": "b"}], "prompt_completion"),
    ],
)
def test_conversations_with_roles_pass(rows, dataset_format):
    check_messages(Dataset.from_list(rows), dataset_format, "src")
