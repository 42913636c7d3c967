"""The verifying half of self-speculative decoding: the full model's logits decide which drafts to keep.

Greedy verification keeps drafts while they equal the full model's argmax (the output is ``generate``'s); sampled
verification is speculative rejection sampling (the output follows the full model's distribution), as transformers'
``_speculative_sampling`` does for an assistant model.
"""

from __future__ import annotations

import torch

from .drafter import Proposal
from .tokens import SamplingSettings

__all__ = ["Verifier", "accept_sampled"]


def accept_sampled(
    drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling of ``g`` drafts against the target distributions.

    Args:
        drafts: ``(B, g)`` drafted tokens.
        draft_probs: ``(B, g, V)`` the distributions they were drawn from.
        target_probs: ``(B, g + 1, V)`` the full model's distributions at the ``g + 1`` verified positions.
        generator: Random generator.

    Returns:
        ``(kept (B,), replacements (B, g + 1))``: per row, how many leading drafts are accepted, and per position the
        token to emit when the row stops there (a residual sample at a rejection, a target sample after ``g``).
    """
    g = drafts.shape[1]
    index = drafts.unsqueeze(-1)
    p = target_probs[:, :g].gather(-1, index).squeeze(-1)  # (B, g)
    q = draft_probs.gather(-1, index).squeeze(-1)  # (B, g)
    uniform = torch.rand(p.shape, generator=generator, device=p.device)
    accepted = uniform < p / q
    kept = accepted.long().cumprod(-1).sum(-1)  # (B,)
    # At a rejection, sample from the residual max(0, p - q); after g accepted drafts, from p itself
    residual = (target_probs[:, :g] - draft_probs).clamp_min(0)
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, target_probs[:, :g], residual)
    fallback = torch.cat([residual, target_probs[:, g:]], dim=1)  # (B, g + 1, V)
    flat = fallback.reshape(-1, fallback.shape[-1])
    replacements = torch.multinomial(flat / flat.sum(-1, keepdim=True), 1, generator=generator)
    return kept, replacements.view(fallback.shape[:2])


class Verifier:
    """Decides a cycle's new tokens from the full model's logits at the drafts' positions.

    In a batch, a cycle keeps the smallest number of accepted drafts over the unfinished rows, so every row stays
    exact and the cache stays rectangular.

    Args:
        sampling: Greedy verification without ``do_sample``, rejection sampling with it.
    """

    def __init__(self, sampling: SamplingSettings):
        self.sampling = sampling

    def new_tokens(self, proposal: Proposal, target_logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The ``(B, kept + 1)`` tokens to write: the kept drafts and one token from the full model.

        Args:
            proposal: The cycle's drafts.
            target_logits: ``(B, g + 1, V)`` the full model's logits at ``x0`` and every draft's position.
            active: ``(B,)`` rows that were unfinished when the cycle started; only they vote on ``kept``.
        """
        batch, length = target_logits.shape[0], proposal.length
        if proposal.tokens:
            drafts = torch.stack(proposal.tokens, dim=1)  # (B, g)
        else:
            drafts = target_logits.new_zeros(batch, 0, dtype=torch.long)
        if self.sampling.do_sample:
            target_probs = self.sampling.probs(target_logits)
            draft_probs = torch.stack(proposal.probs, dim=1) if proposal.probs else target_probs.new_zeros(batch, 0, 1)
            kept_per_row, replacements = accept_sampled(drafts, draft_probs, target_probs, self.sampling.generator)
        else:
            replacements = target_logits.argmax(-1)  # (B, g + 1)
            kept_per_row = (drafts == replacements[:, :length]).long().cumprod(-1).sum(-1)
        kept = int(kept_per_row[active].min())
        # Rows that accepted more than `kept` drafts continue with their accepted draft: still an exact sample
        bonus = replacements[:, kept]
        if kept < length:
            bonus = torch.where(kept_per_row > kept, drafts[:, kept], bonus)
        return torch.cat([drafts[:, :kept], bonus[:, None]], dim=1)
