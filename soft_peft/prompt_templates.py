"""The prompt templates of the paper's datasets, shared by training and generation.

Training converts Alpaca, GSM8K and TriviaQA rows to prompt-completion with these templates ([`soft_peft.data`]); a
model trained that way answers best when asked in the same words, so `soft-peft generate --prompt_format` wraps a
prompt in them ([`format_prompt`]). Kept free of heavy imports: `soft-peft generate --help` reads them.
"""

from __future__ import annotations

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "ANSWER_SEPARATOR",
    "CONVERTED_FORMATS",
    "DATASET_FORMATS",
    "GSM8K_PROMPT",
    "PROMPT_FORMATS",
    "TRIVIAQA_PROMPT",
    "TRL_FORMATS",
    "format_prompt",
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

# The dataset formats whose rows these templates turn into prompt-completion (`--dataset_format` in training)
PROMPT_FORMATS = ("alpaca", "gsm8k", "triviaqa")
# The row formats of training and evaluation data (`--dataset_format`), here rather than in soft_peft.data so that the
# command line's `--help` lists them without importing `datasets`: TRL's dataset types, trained and scored as they
# are, then the paper's datasets, converted to prompt-completion by the templates of this module
TRL_FORMATS = ("messages", "prompt_completion", "text")
CONVERTED_FORMATS = PROMPT_FORMATS
DATASET_FORMATS = ("auto", *TRL_FORMATS, *CONVERTED_FORMATS)


# GSM8K and TriviaQA share the question-answer layout
_QUESTION_TEMPLATES = {"gsm8k": GSM8K_PROMPT, "triviaqa": TRIVIAQA_PROMPT}


def format_prompt(text: str, prompt_format: str, context: str = "") -> str:
    """``text`` as the prompt of a training row of ``prompt_format``: the Alpaca instruction template, or GSM8K's and
    TriviaQA's ``"Question: ...\\nAnswer:"``. The data converters build every training prompt with it.

    Args:
        text: The instruction (Alpaca) or the question (GSM8K, TriviaQA).
        prompt_format: One of [`PROMPT_FORMATS`].
        context: Alpaca's ``input`` column; empty (the default) selects the template without an input.

    Returns:
        The prompt, exactly as training formats it.

    Raises:
        ValueError: for another format.
    """
    if prompt_format == "alpaca":
        context = context.strip()
        template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=text.strip(), input=context)
    if prompt_format in _QUESTION_TEMPLATES:
        return _QUESTION_TEMPLATES[prompt_format].format(question=text.strip())
    raise ValueError(f"prompt_format={prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}.")
