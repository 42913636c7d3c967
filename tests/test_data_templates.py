"""The GSM8K / TriviaQA templates tokenize alike in training and at inference, with the real SmolLM2 tokenizer: the
prompt's tokens are a prefix of prompt + completion (so TRL trains on exactly the context inference gives), and the
prompt tokens evaluation and generation condition on are those training saw."""

from __future__ import annotations

import pytest
from datasets import Dataset
from get_smollm2 import DEFAULT_DIR

from soft_peft.data import gsm8k_to_prompt_completion, triviaqa_to_prompt_completion
from soft_peft.evaluation.examples import tokenize_examples

GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
        "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {"question": "What is 7 times 6?", "answer": "42\n#### 42"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.", "answer": "(2/2)=1\n#### 3"},
]
TRIVIAQA_ROWS = [
    {
        "question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
        "answer": {"value": "Sunset Boulevard"},
    },
    {"question": "In what year did man first land on the Moon?", "answer": {"value": "1969"}},
    {"question": "Who wrote 'Ulysses'?", "answer": {"value": "James Joyce"}},
]


@pytest.fixture(scope="module")
def tokenizer():
    if not (DEFAULT_DIR / "tokenizer.json").exists():
        pytest.skip(f"the SmolLM2 tokenizer is not cached in {DEFAULT_DIR} (run `python tools/get_smollm2.py`)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_DIR)


@pytest.mark.parametrize(
    "convert, rows", [(gsm8k_to_prompt_completion, GSM8K_ROWS), (triviaqa_to_prompt_completion, TRIVIAQA_ROWS)]
)
def test_training_and_inference_tokenize_the_prompt_alike(tokenizer, convert, rows):
    dataset = convert(Dataset.from_list(rows))
    examples = tokenize_examples(dataset, tokenizer, "prompt_completion")
    assert len(examples) == len(rows)
    for row, example in zip(dataset, examples, strict=True):
        assert row["prompt"].endswith("Answer:") and row["completion"].startswith(" ")
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        # What TRL's SFTTrainer trains on (it warns when this fails): the prompt's own tokens open the sequence
        assert full_ids[: len(prompt_ids)] == prompt_ids, tokenizer.convert_ids_to_tokens(full_ids[: len(prompt_ids)])
        # What evaluation scores after and generation continues from: the same prompt tokens, no lone space
        assert example.prompt_ids == prompt_ids
        assert example.completion_ids[:-1] == full_ids[len(prompt_ids) :]  # then EOS
        assert tokenizer.convert_ids_to_tokens(prompt_ids[-1]) == ":"


def test_completion_keeps_the_answer_text():
    gsm8k = gsm8k_to_prompt_completion(Dataset.from_list(GSM8K_ROWS[1:2]))[0]
    trivia = triviaqa_to_prompt_completion(Dataset.from_list(TRIVIAQA_ROWS[:1]))[0]
    assert gsm8k == {"prompt": "Question: What is 7 times 6?\nAnswer:", "completion": " 42\n#### 42"}
    assert trivia["completion"] == " Sunset Boulevard"
