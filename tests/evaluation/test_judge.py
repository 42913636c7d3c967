"""The pairwise judge harness: wins, losses and ties in both orders, with stub judges (tests only)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from soft_peft.evaluation.judge import JUDGE_PROMPT, LMJudge, judge_pairwise


def longer_is_better(instruction, response_1, response_2):
    """A position-fair stub: prefers the longer response, tie on equal length."""
    if len(response_1) == len(response_2):
        return "tie"
    return "1" if len(response_1) > len(response_2) else "2"


def always_first(instruction, response_1, response_2):
    """A maximally position-biased stub."""
    return "1"


def test_counts_wins_losses_ties_in_both_orders():
    calls = []

    def judge(instruction, response_1, response_2):
        calls.append((instruction, response_1, response_2))
        return longer_is_better(instruction, response_1, response_2)

    result = judge_pairwise(["q1", "q2", "q3", "q4"], ["long", "s", "same", "xx"], ["s", "long", "SAME", "y"], judge)
    assert (result.wins, result.losses, result.ties) == (2, 1, 1)
    assert result.verdicts == [("1", "2"), ("2", "1"), ("tie", "tie"), ("1", "2")]
    # Each pair judged twice, A first then B first
    assert calls[:2] == [("q1", "long", "s"), ("q1", "s", "long")]
    assert len(calls) == 8
    assert result.win_rate == pytest.approx((2 + 0.5) / 4)


def test_position_bias_becomes_ties():
    result = judge_pairwise(["q"] * 3, ["a", "b", "c"], ["x", "y", "z"], always_first)
    assert (result.wins, result.losses, result.ties) == (0, 0, 3)


def test_bad_verdict_and_lengths_are_errors():
    with pytest.raises(ValueError, match="must return '1', '2' or 'tie'"):
        judge_pairwise(["q"], ["a"], ["b"], lambda *args: "A")
    with pytest.raises(ValueError, match="one response of each model"):
        judge_pairwise(["q", "r"], ["a"], ["b"], longer_is_better)


def test_lm_judge_reads_the_most_probable_verdict():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    judge = LMJudge(model, tokenizer)
    text = JUDGE_PROMPT.format(instruction="i", response_1="a", response_2="b")
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1]
    expected = ("1", "2", "tie")[int(torch.argmax(logits[judge.candidate_ids]))]
    assert judge("i", "a", "b") == expected
    with pytest.raises(ValueError, match="must contain"):
        LMJudge(model, tokenizer, prompt="no placeholders")
