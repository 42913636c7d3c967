"""Token bookkeeping shared by the decoders: special tokens, EOS as ``generate`` handles it, sampling, confidence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "CONFIDENCES",
    "SamplingSettings",
    "SequenceWriter",
    "check_sampling",
    "exit_confidence",
    "resolve_special_tokens",
    "sampling_probs",
]

# Confidence measures of a next-token distribution (see `exit_confidence`)
CONFIDENCES = ("max_prob", "margin")


def resolve_special_tokens(
    model: nn.Module, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
) -> tuple[list[int], int | None]:
    """EOS ids and pad id as ``generate`` resolves them: explicit values, else the model's ``generation_config``.

    Returns:
        ``(eos_ids, pad_id)``; the pad id falls back to the first EOS id, as in ``generate``.
    """
    generation_config = getattr(model, "generation_config", None)
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    if pad_token_id is None and generation_config is not None:
        pad_token_id = generation_config.pad_token_id
    if eos_token_id is None:
        eos_ids = []
    elif isinstance(eos_token_id, int):
        eos_ids = [eos_token_id]
    else:
        eos_ids = [int(t) for t in eos_token_id]
    if pad_token_id is None and eos_ids:
        pad_token_id = eos_ids[0]
    return eos_ids, pad_token_id


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` for a temperature <= 0 or a ``top_p`` outside (0, 1]."""
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}; use do_sample=False for greedy decoding.")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution ``generate`` samples from: temperature, then nucleus (top-p) filtering.

    Args:
        logits: ``(..., V)`` raw logits.
        temperature: Softmax temperature (> 0).
        top_p: Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (always at least one).

    Returns:
        ``(..., V)`` float32 probabilities.
    """
    scores = logits.float() / temperature
    if top_p < 1.0:
        # As transformers' TopPLogitsWarper: drop the low tail whose cumulative mass is <= 1 - top_p
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1)


@dataclass(frozen=True)
class SamplingSettings:
    """How the decoders turn logits into tokens: argmax, or a sample as ``generate(do_sample=True)`` draws it.

    Attributes:
        do_sample: Sample instead of taking the argmax.
        temperature: Softmax temperature (> 0), used when sampling.
        top_p: Nucleus mass in (0, 1], used when sampling.
        generator: Random generator for sampling.

    Raises:
        ValueError: when sampling with a temperature <= 0 or a ``top_p`` outside (0, 1].
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.do_sample:
            check_sampling(self.temperature, self.top_p)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., V)`` the distribution sampled from (see [`sampling_probs`])."""
        return sampling_probs(logits, self.temperature, self.top_p)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next tokens ``(B,)`` from logits ``(B, V)``: argmax, or a sample (then also its ``(B, V)`` distribution)."""
        if not self.do_sample:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1), probs


def exit_confidence(logits: torch.Tensor, kind: str = "max_prob") -> torch.Tensor:
    """Confidence of each row's next-token distribution.

    Args:
        logits: ``(B, V)`` exit logits.
        kind: ``"max_prob"`` (the largest softmax probability) or ``"margin"`` (top-1 minus top-2 probability).

    Returns:
        ``(B,)`` float32 confidences in [0, 1].
    """
    probs = logits.float().softmax(-1)
    if kind == "max_prob":
        return probs.max(-1).values
    top = probs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


class SequenceWriter:
    """Appends generated tokens exactly as ``generate`` does: pad after a row's EOS, stop when all rows are done.

    Args:
        input_ids: ``(B, T)`` prompts.
        max_new_tokens: Stop after this many new tokens.
        eos_ids: Token ids that finish a row.
        pad_token_id: Written after a row has finished.
    """

    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: list[int], pad_token_id: int | None):
        self.prompt = input_ids
        self.max_new_tokens = max_new_tokens
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
        self.pad_token_id = pad_token_id
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.new_tokens: list[torch.Tensor] = []
        self.done = False

    @property
    def count(self) -> int:
        """Number of new tokens written so far."""
        return len(self.new_tokens)

    @property
    def last(self) -> torch.Tensor:
        """``(B,)`` the last written tokens."""
        return self.new_tokens[-1]

    def append(self, tokens: torch.Tensor) -> bool:
        """Write one step's tokens ``(B,)``; return ``True`` when generation is over."""
        if self.done:
            raise RuntimeError("SequenceWriter.append called after generation ended.")
        if self.pad_token_id is not None:
            tokens = torch.where(self.unfinished, tokens, torch.full_like(tokens, self.pad_token_id))
        self.new_tokens.append(tokens)
        if self.eos.numel():
            self.unfinished &= ~torch.isin(tokens, self.eos)
        self.done = self.count >= self.max_new_tokens or not bool(self.unfinished.any())
        return self.done

    def extend(self, tokens: torch.Tensor) -> bool:
        """Write ``(B, n)`` tokens column by column, stopping when generation ends; return ``True`` when it has."""
        for column in tokens.unbind(dim=1):
            if self.append(column):
                return True
        return False

    def sequences(self) -> torch.Tensor:
        """``(B, T + new)`` prompts followed by the generated tokens, as ``generate`` returns them."""
        return torch.cat([self.prompt, torch.stack(self.new_tokens, dim=1)], dim=1)
