"""Greedy generation at each exit: quality against the reference and time per generated token.

Each exit is decoded by [`soft_peft.extract_submodel`], a standard transformers model that shares the
parent's first ``k`` layers, final norm and head (no copy), so ``generate`` runs with its KV cache and only ``k``
layers per token. Examples are decoded one at a time (batch 1), so padding never changes a sub-model's output and the
timing is per sequence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..inference.submodel import extract_submodel
from .examples import EvalExample
from .metrics import exact_match, gsm8k_exact_match, token_f1

__all__ = ["ExitGenerations", "generate_at_exits", "score_generations"]


@dataclass
class ExitGenerations:
    """Greedy generations of one exit.

    Attributes:
        layer: The exit.
        texts: One decoded completion per example (special tokens removed).
        num_new_tokens: Tokens generated in total (EOS included).
        seconds: Wall time of all ``generate`` calls.
    """

    layer: int
    texts: list[str]
    num_new_tokens: int
    seconds: float

    @property
    def ms_per_token(self) -> float:
        """Mean wall time per generated token, in milliseconds (prefill included, after one untimed warm-up call)."""
        return 1000.0 * self.seconds / max(self.num_new_tokens, 1)


def generate_at_exits(
    model: nn.Module,
    tokenizer,
    examples: Sequence[EvalExample],
    exits: Sequence[int],
    max_new_tokens: int = 256,
    progress: bool = True,
) -> dict[int, ExitGenerations]:
    """Greedy-decode every example's prompt with the sub-model of each exit.

    Args:
        model: A transformers causal LM.
        tokenizer: Its tokenizer (for EOS, padding and decoding).
        examples: Examples with a non-empty prompt.
        exits: Exits to decode with.
        max_new_tokens: Generation budget per example.
        progress: Show a tqdm bar.

    Returns:
        ``{layer: ExitGenerations}``.

    Raises:
        ValueError: when an example has no prompt (``text`` datasets cannot be generated from).
    """
    if any(not e.prompt_ids for e in examples):
        raise ValueError(
            "--generate needs a prompt to condition on, but this dataset has rows without one ('text' data). "
            "Use prompt/completion, messages, Alpaca or GSM8K data, or drop --generate."
        )
    model.eval()
    results = {}
    bar = tqdm(total=len(examples) * len(exits), desc="generation", disable=not progress)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for layer in exits:
        submodel = extract_submodel(model, layer)
        texts, num_new, seconds = [], 0, 0.0
        device = next(model.parameters()).device
        # One untimed call first: the first `generate` of a model pays one-off set-up costs
        with torch.inference_mode():
            warm_up = torch.tensor([examples[0].prompt_ids], device=device)
            submodel.generate(input_ids=warm_up, max_new_tokens=2, do_sample=False, pad_token_id=pad_token_id)
        for example in examples:
            input_ids = torch.tensor([example.prompt_ids], device=device)
            with torch.inference_mode():
                started = time.perf_counter()
                output = submodel.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=pad_token_id,
                )
                seconds += time.perf_counter() - started
            new_tokens = output[0, input_ids.shape[1] :]
            num_new += new_tokens.numel()
            texts.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
            bar.update(1)
        results[layer] = ExitGenerations(layer, texts, num_new, seconds)
    bar.close()
    return results


def score_generations(generations: ExitGenerations, references: Sequence[str], task: str) -> dict[str, float]:
    """Quality of one exit's generations.

    Args:
        generations: Output of [`generate_at_exits`] for one exit.
        references: The reference completions, in the same order.
        task: ``"gsm8k"`` (exact match of the final ``#### N``) or ``"text"`` (exact match and token-F1).

    Returns:
        ``{"gsm8k_accuracy"}`` or ``{"exact_match", "token_f1"}``, plus ``"ms_per_token"`` and ``"num_generated"``.
    """
    pairs = list(zip(generations.texts, references, strict=True))
    count = max(len(pairs), 1)
    if task == "gsm8k":
        scores = {"gsm8k_accuracy": sum(gsm8k_exact_match(p, r) for p, r in pairs) / count}
    else:
        scores = {
            "exact_match": sum(exact_match(p, r) for p, r in pairs) / count,
            "token_f1": sum(token_f1(p, r) for p, r in pairs) / count,
        }
    scores["ms_per_token"] = generations.ms_per_token
    scores["num_generated"] = len(pairs)
    return scores
