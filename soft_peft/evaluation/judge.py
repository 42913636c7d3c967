"""Pairwise judging of two sets of generations into wins, losses and ties (the paper's PandaLM table).

A judge is any callable ``judge(instruction, response_1, response_2) -> "1" | "2" | "tie"``. Every pair is judged in
both orders to cancel position bias: a win needs the same response preferred in both orders, a disagreement counts as
a tie. [`LMJudge`] makes such a callable from any local causal LM with the PandaLM-style prompt below, reading the
verdict from the next-token probabilities of ``1``, ``2`` and ``Tie`` (one forward, no sampling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = ["JUDGE_PROMPT", "LMJudge", "PairwiseResult", "Verdict", "judge_pairwise"]

Verdict = str  # "1", "2" or "tie"

# PandaLM's input layout (Wang et al., 2023): the judge answers "1", "2" or "Tie" after "### Evaluation:"
JUDGE_PROMPT = (
    "Below are two responses for a given task. The task is defined by the Instruction. Evaluate the responses and "
    "answer 1 if Response 1 is better, 2 if Response 2 is better, or Tie if they are equally good.\n\n"
    "### Instruction:\n{instruction}\n\n### Response 1:\n{response_1}\n\n### Response 2:\n{response_2}\n\n"
    "### Evaluation:\n"
)
_VERDICTS = ("1", "2", "tie")


@dataclass
class PairwiseResult:
    """Wins, losses and ties of responses A against responses B.

    Attributes:
        wins: Pairs where A was preferred in both orders.
        losses: Pairs where B was preferred in both orders.
        ties: Pairs judged a tie, or judged differently in the two orders (position bias).
        verdicts: Per pair, ``(verdict with A shown first, verdict with B shown first)`` as returned by the judge.
    """

    wins: int = 0
    losses: int = 0
    ties: int = 0
    verdicts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def win_rate(self) -> float:
        """``(wins + ties / 2) / pairs``, the paper's single-number summary; 0.5 means A and B are equal."""
        total = self.wins + self.losses + self.ties
        return (self.wins + 0.5 * self.ties) / total if total else 0.0


def _check(verdict: str, where: str) -> str:
    normalized = str(verdict).strip().lower()
    if normalized not in _VERDICTS:
        raise ValueError(f"The judge returned {verdict!r} for {where}; a judge must return '1', '2' or 'tie'.")
    return normalized


def judge_pairwise(
    instructions: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    judge: Callable[[str, str, str], Verdict],
    progress: bool = True,
) -> PairwiseResult:
    """Judge every ``(A, B)`` pair in both orders and count A's wins, losses and ties.

    Args:
        instructions: The prompts the responses answer.
        responses_a: Responses of model A (e.g. a SoFT sub-model).
        responses_b: Responses of model B (e.g. the SFT model), same order.
        judge: ``judge(instruction, response_1, response_2)`` returning ``"1"``, ``"2"`` or ``"tie"``.
        progress: Show a tqdm bar.

    Returns:
        A [`PairwiseResult`] from A's point of view.

    Raises:
        ValueError: for sequences of different lengths, or a verdict outside ``1 / 2 / tie``.
    """
    if not len(instructions) == len(responses_a) == len(responses_b):
        raise ValueError(
            f"judge_pairwise needs one response of each model per instruction, got {len(instructions)} instructions, "
            f"{len(responses_a)} A responses and {len(responses_b)} B responses."
        )
    result = PairwiseResult()
    rows = zip(instructions, responses_a, responses_b, strict=True)
    for index, (instruction, a, b) in enumerate(tqdm(list(rows), desc="judging", disable=not progress)):
        a_first = _check(judge(instruction, a, b), f"pair {index} (A first)")
        b_first = _check(judge(instruction, b, a), f"pair {index} (B first)")
        result.verdicts.append((a_first, b_first))
        if a_first == "1" and b_first == "2":
            result.wins += 1
        elif a_first == "2" and b_first == "1":
            result.losses += 1
        else:
            result.ties += 1
    return result


class LMJudge:
    """A judge callable backed by a local causal LM and [`JUDGE_PROMPT`].

    The verdict is the most probable of the first tokens of ``"1"``, ``"2"`` and ``"Tie"`` right after the prompt.

    Args:
        model: A transformers causal LM (ideally an instruction-tuned judge such as PandaLM-7B).
        tokenizer: Its tokenizer.
        prompt: A template with ``{instruction}``, ``{response_1}`` and ``{response_2}``.
        max_length: Prompts longer than this many tokens are truncated from the left.
    """

    def __init__(self, model, tokenizer, prompt: str = JUDGE_PROMPT, max_length: int = 2048):
        for key in ("{instruction}", "{response_1}", "{response_2}"):
            if key not in prompt:
                raise ValueError(f"The judge prompt must contain {key}.")
        self.model, self.tokenizer, self.prompt, self.max_length = model.eval(), tokenizer, prompt, max_length
        self.candidate_ids = []
        for text in ("1", "2", "Tie"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"The judge tokenizer encodes {text!r} to no token.")
            self.candidate_ids.append(ids[0])
        if len(set(self.candidate_ids)) != 3:
            raise ValueError(f"'1', '2' and 'Tie' must start with different tokens, got {self.candidate_ids}.")

    def __call__(self, instruction: str, response_1: str, response_2: str) -> Verdict:
        """The verdict on one ordered pair: ``"1"``, ``"2"`` or ``"tie"``."""
        text = self.prompt.format(instruction=instruction, response_1=response_1, response_2=response_2)
        ids = self.tokenizer(text)["input_ids"][-self.max_length :]
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=device)).logits[0, -1]  # (V,)
        best = int(torch.argmax(logits[self.candidate_ids]))
        return _VERDICTS[best]
