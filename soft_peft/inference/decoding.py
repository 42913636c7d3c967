"""The state both layer-wise decoders share: stack, cache, written tokens, padding mask and work counters.

A decoder built on [`DecodingState`] only says which layers run on which positions and which logits pick the next
tokens; the state runs the layers (counting them), keeps the cache, the sequences and the padding mask, and turns its
counters into the [`DecodeStats`] fields every decoder reports. Every decoder returns one shape, [`DecodeOutput`]:
the ``sequences`` ``generate`` would return and the decoder's ``stats``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from .stack import DecoderStack, check_generation_inputs
from .tokens import SamplingSettings, SequenceWriter, resolve_special_tokens
from .vocab import SubsetHead

__all__ = ["DecodeOutput", "DecodeStats", "DecodingState"]


@dataclass(kw_only=True)
class DecodeStats:
    """Work and speed counters every decoder reports.

    Attributes:
        new_tokens: Generated positions (the length of the new part of ``sequences``).
        seconds: Wall time of the call.
        tokens_per_second: ``new_tokens * batch / seconds``.
        layer_forwards: Per decoder layer (index 0 is layer 1), how many times it ran (prefill included).
        head_forwards: Calls of the final norm + LM head (on the full vocabulary or a subset).
    """

    new_tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    layer_forwards: list[int] = field(default_factory=list)
    head_forwards: int = 0


StatsT = TypeVar("StatsT", bound=DecodeStats)


@dataclass
class DecodeOutput(Generic[StatsT]):
    """What every decoder returns.

    Attributes:
        sequences: ``(B, T + new_tokens)`` prompts and generated tokens, as ``generate`` returns them.
        stats: The decoder's counters: a [`DecodeStats`] subclass (``SpeculativeStats``, ``DynamicStats``).
    """

    sequences: torch.Tensor
    stats: StatsT


class DecodingState:
    """One generation call's decoding state over a [`DecoderStack`]: cache, sequences, padding mask and counters.

    Args:
        stack: The model's [`DecoderStack`].
        input_ids: ``(B, T)`` prompts, left-padded for ``B > 1``.
        attention_mask: ``(B, T)`` padding mask, or ``None``.
        max_new_tokens: Number of tokens to generate (>= 1).
        eos_token_id: EOS id(s); default the model's ``generation_config``.
        pad_token_id: Written after a row's EOS; default ``generation_config.pad_token_id``, else the EOS id.
        extra_positions: Positions that may be run beyond the last generated one (drafts that get cropped).

    Attributes:
        stack, cache, writer: The stack, its ``DynamicCache`` and the [`SequenceWriter`].
        batch, prompt_length: ``B`` and ``T``.

    Raises:
        ValueError: for bad inputs (see [`check_generation_inputs`]).
    """

    def __init__(
        self,
        stack: DecoderStack,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        extra_positions: int = 0,
    ):
        self.started = time.perf_counter()
        self.stack = stack
        eos_ids, pad_id = resolve_special_tokens(stack.model, eos_token_id, pad_token_id)
        input_ids = input_ids.to(stack.model.device)
        padding_mask = check_generation_inputs(input_ids, attention_mask, max_new_tokens, pad_id)
        self.batch, self.prompt_length = input_ids.shape
        # The padding mask of every position that may run: prompt, new tokens, and drafts beyond them
        self.full_mask = None
        if padding_mask is not None:
            ones = padding_mask.new_ones(self.batch, max_new_tokens + extra_positions)
            self.full_mask = torch.cat([padding_mask, ones], dim=1)
        self.writer = SequenceWriter(input_ids, max_new_tokens, eos_ids, pad_id)
        self.cache = stack.new_cache()
        self.layer_forwards = [0] * stack.num_layers
        self.head_forwards = 0

    @property
    def position(self) -> int:
        """Absolute position of the last written token, the next one to feed (its states are not cached yet)."""
        return self.prompt_length + self.writer.count - 1

    def embed(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Input embeddings ``(B, q, H)`` of token ids ``(B, q)`` at positions ``start..start+q-1``."""
        inputs = self.stack.step_inputs(self.full_mask, start, input_ids.shape[1], self.batch)
        return self.stack.embed(input_ids, inputs)

    def run(self, hidden: torch.Tensor, first: int, last: int, start: int) -> torch.Tensor:
        """Run layers ``first..last`` on ``hidden`` ``(B, q, H)`` at positions ``start..``, extending the cache."""
        for index in range(first - 1, last):
            self.layer_forwards[index] += 1
        inputs = self.stack.step_inputs(self.full_mask, start, hidden.shape[1], self.batch)
        return self.stack.run_layers(hidden, first, last, inputs, self.cache)

    def fill_kv(self, hidden: torch.Tensor, first: int, last: int, start: int) -> None:
        """CALM-style keys and values of layers ``first..last`` from one state (see [`DecoderStack.fill_kv`])."""
        for index in range(first - 1, last):
            self.layer_forwards[index] += 1
        inputs = self.stack.step_inputs(self.full_mask, start, hidden.shape[1], self.batch)
        self.stack.fill_kv(hidden, first, last, inputs, self.cache)

    def logits_from_raw(self, hidden: torch.Tensor, subset: SubsetHead | None = None) -> torch.Tensor:
        """Exit logits of raw states ``(..., H)``: ``(..., V)``, or ``(..., K)`` on ``subset``'s ids."""
        self.head_forwards += 1
        return self.stack.head.logits_from_raw(hidden) if subset is None else subset.logits_from_raw(hidden)

    def prefill(self, sampling: SamplingSettings) -> bool:
        """Run the whole prompt through every layer and write the first new tokens; ``True`` when generation ended."""
        hidden = self.run(self.embed(self.writer.prompt, 0), 1, self.stack.num_layers, 0)
        return self.writer.append(sampling.choose(self.logits_from_raw(hidden[:, -1]))[0])

    def crop(self, length: int) -> None:
        """Cut every layer of the cache back to ``length`` positions."""
        self.stack.crop(self.cache, 1, self.stack.num_layers, length)

    def all_unfinished(self, passed: torch.Tensor) -> bool:
        """Whether ``passed`` ``(B,)`` holds for every row still generating (finished rows do not vote)."""
        return bool(passed[self.writer.unfinished].all())

    def finish(self, stats: StatsT) -> DecodeOutput[StatsT]:
        """Fill ``stats``' shared counters from this state (call last: it stops the clock); return the output."""
        stats.seconds = time.perf_counter() - self.started
        stats.new_tokens = self.writer.count
        stats.tokens_per_second = self.writer.count * self.batch / stats.seconds
        stats.layer_forwards = self.layer_forwards
        stats.head_forwards = self.head_forwards
        return DecodeOutput(sequences=self.writer.sequences(), stats=stats)
