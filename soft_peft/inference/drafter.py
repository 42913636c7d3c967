"""The drafting half of self-speculative decoding: early exits propose tokens, and the draft length adapts.

Shaped like transformers' ``CandidateGenerator`` (``generation/candidate_generator.py``): [`ExitDrafter.propose`]
returns the candidates of one cycle and [`ExitDrafter.update`] learns from how many the verifier kept. Unlike an
assistant model, the drafter shares the verifier's layers and cache: it leaves each position's state at the exit that
drafted from it ([`LaggingPositions`]), and the verifier carries them up from there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .decoding import DecodingState
from .stack import LaggingPositions
from .tokens import SamplingSettings, exit_confidence
from .vocab import SubsetHead

__all__ = ["ExitDrafter", "Proposal", "choose_draft_length"]

# Pseudo-counts behind the adaptive draft length before any evidence: acceptance 0.75
_PRIOR_ACCEPTED, _PRIOR_REJECTED = 3.0, 1.0


def choose_draft_length(
    acceptance: float,
    draft_exit: int,
    num_layers: int,
    head_cost: float,
    max_draft: int,
    draft_head_cost: float | None = None,
) -> int:
    """Draft length maximising expected tokens per unit of compute, for a per-token acceptance rate.

    A cycle drafting ``g`` tokens yields ``(1 - a^(g+1)) / (1 - a)`` tokens and costs about ``(g + 1) * d + g * h_d``
    layer passes to draft plus ``L - d + h`` to verify (``h``, ``h_d``: the verifying and drafting heads' costs in
    layers).

    Args:
        acceptance: Per-token acceptance rate ``a`` in [0, 1].
        draft_exit: Drafting exit ``d``.
        num_layers: Depth ``L``.
        head_cost: Cost of one final norm + head call, in decoder layers.
        max_draft: Largest draft length considered.
        draft_head_cost: Cost of the drafting head in layers (smaller with a vocabulary subset); default ``head_cost``.

    Returns:
        The best ``g`` in ``1..max_draft``.
    """
    draft_head_cost = head_cost if draft_head_cost is None else draft_head_cost
    best, best_rate = 1, -math.inf
    for length in range(1, max_draft + 1):
        if acceptance >= 1.0:
            tokens = length + 1.0
        else:
            tokens = (1 - acceptance ** (length + 1)) / (1 - acceptance)
        cost = (length + 1) * draft_exit + length * draft_head_cost + (num_layers - draft_exit) + head_cost
        if tokens / cost > best_rate:
            best, best_rate = length, tokens / cost
    return best


@dataclass
class Proposal:
    """One cycle's drafts, and the states the verifier carries up.

    Attributes:
        start: Absolute position of the last verified token ``x0``, the first position in ``lagging``.
        tokens: ``(B,)`` drafted tokens, in order.
        probs: Their ``(B, V)`` draft distributions when sampling, else empty.
        lagging: ``x0`` and every draft's position, each at the layer it reached (the last one unverified).
    """

    start: int
    tokens: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    lagging: LaggingPositions = field(default_factory=LaggingPositions)

    @property
    def length(self) -> int:
        """Number of drafts ``g``."""
        return len(self.tokens)


class ExitDrafter:
    """Drafts from early exits: each token from the first exit confident enough, for an adaptive or fixed length.

    Args:
        state: The call's [`DecodingState`].
        exits: Exits to draft from, in order of trial (``early_draft_exits``, then the draft exit).
        sampling: How draft tokens are chosen.
        num_draft_tokens: Drafts per cycle, or ``"adaptive"`` (see [`choose_draft_length`]).
        max_draft_tokens: Upper bound of the adaptive length.
        stop_threshold: Stop drafting at a draft no exit is more confident of than this; ``None``: never.
        subset: Draft from this slice of the head only.

    Attributes:
        stops: Cycles whose drafting ended early at an unconfident draft.
        drafts_by_exit: ``{exit: drafted tokens}``, summed over unfinished rows.
    """

    def __init__(
        self,
        state: DecodingState,
        exits: Sequence[int],
        sampling: SamplingSettings,
        num_draft_tokens: int | str,
        max_draft_tokens: int,
        stop_threshold: float | None,
        subset: SubsetHead | None,
    ):
        self.state, self.exits, self.sampling = state, list(exits), sampling
        self.num_draft_tokens, self.max_draft_tokens = num_draft_tokens, max_draft_tokens
        self.stop_threshold, self.subset = stop_threshold, subset
        self.stops, self.drafts_by_exit = 0, {}
        self.accepted, self.rejections = _PRIOR_ACCEPTED, _PRIOR_REJECTED
        stack = state.stack
        # Decoding is bound by reading weights: compare the head's size with one layer's
        layer_size = sum(p.numel() for p in stack.layers[0].parameters())
        self.head_cost = stack.head.lm_head.weight.numel() / max(layer_size, 1)
        self.draft_head_cost = self.head_cost if subset is None else self.head_cost * subset.size / subset.vocab_size

    def length(self) -> int:
        """Drafts to propose this cycle: the fixed or adaptive length, within what is left to generate."""
        length = self.num_draft_tokens
        if length == "adaptive":
            acceptance = self.accepted / (self.accepted + self.rejections)
            length = choose_draft_length(
                acceptance, self.exits[-1], self.state.stack.num_layers, self.head_cost, self.max_draft_tokens,
                self.draft_head_cost,
            )  # fmt: skip
        writer = self.state.writer
        return min(length, writer.max_new_tokens - writer.count - 1)  # a cycle yields at most length + 1 tokens

    def propose(self, length: int) -> Proposal:
        """Draft up to ``length`` tokens after the last written one, one position at a time.

        Drafting stops early at the first draft no exit is confident of; that draft is dropped, and its position (the
        last one) is only verified.
        """
        proposal = Proposal(start=self.state.position)
        token, rows = self.state.writer.last, int(self.state.writer.unfinished.sum())
        for offset in range(length):
            hidden, layer, drafted = self._draft_one(token, proposal.start + offset, proposal.lagging)
            proposal.lagging.append(hidden, layer)
            if drafted is None:
                self.stops += 1
                return proposal
            token, probs = drafted
            proposal.tokens.append(token)
            proposal.probs.append(probs)
            self.drafts_by_exit[layer] = self.drafts_by_exit.get(layer, 0) + rows
        proposal.lagging.append(self.state.embed(token[:, None], proposal.start + length), 0)
        return proposal

    def update(self, kept: int, length: int) -> None:
        """Learn from a cycle that kept ``kept`` of ``length`` drafts (the adaptive length's acceptance estimate)."""
        self.accepted += kept
        self.rejections += 1 if kept < length else 0

    def _draft_one(self, token: torch.Tensor, position: int, lagging: LaggingPositions):
        """Run ``token`` ``(B,)`` at ``position`` up the exits until one is confident of its next token.

        Returns:
            ``(state (B, 1, H), layer, (draft (B,), probs or None))``; the last item is ``None`` when no exit is
            confident.
        """
        hidden, layer = self.state.embed(token[:, None], position), 0  # (B, 1, H)
        for exit_layer in self.exits:
            hidden, layer = lagging.advance(hidden, layer, exit_layer, position, self.state.run), exit_layer
            logits = self.state.logits_from_raw(hidden[:, -1], self.subset)
            draft, probs = self.sampling.choose(logits)
            if self.stop_threshold is None or self.state.all_unfinished(exit_confidence(logits) > self.stop_threshold):
                if self.subset is not None:
                    draft, probs = self.subset.token_ids[draft], None if probs is None else self.subset.to_vocab(probs)
                return hidden, layer, (draft, probs)
        return hidden, layer, None
