"""`format_prompt` gives, for each of the paper's formats, exactly the prompt training builds from a row."""

from __future__ import annotations

import pytest
from datasets import Dataset

from soft_peft.data import to_trl_format
from soft_peft.prompt_templates import PROMPT_FORMATS, format_prompt

ROWS = {
    "alpaca": {"instruction": "  Name three primary colours. ", "input": "", "output": "Red, yellow and blue."},
    "gsm8k": {"question": " Janet has 3 apples and eats one. How many are left?", "answer": "2 #### 2"},
    "triviaqa": {"question": "Which planet is largest? ", "answer": {"value": "Jupiter"}},
}
# What a user types: the instruction or question, with or without the row's stray spaces
ASKED = {
    "alpaca": "Name three primary colours.",
    "gsm8k": ROWS["gsm8k"]["question"],
    "triviaqa": "Which planet is largest?",
}


@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS)
def test_the_prompt_is_the_training_rows_prompt(prompt_format):
    trained, _ = to_trl_format(Dataset.from_list([ROWS[prompt_format]]), prompt_format)
    assert format_prompt(ASKED[prompt_format], prompt_format) == trained[0]["prompt"]


def test_another_format_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"prompt_format='messages': expected one of alpaca, gsm8k, triviaqa\."):
        format_prompt("hi", "messages")
