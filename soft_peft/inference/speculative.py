"""Self-speculative decoding: an early exit drafts, the full model verifies, over one shared KV cache.

One cycle, with draft exit ``d`` of ``L`` layers and ``g`` drafted tokens:

1. Draft. Layers ``1..d`` run one position at a time on the last verified token ``x0`` and the drafts ``t1..tg``;
   exit ``d`` proposes ``t1..tg`` (from the whole vocabulary, or from ``draft_vocab`` only: see [`SubsetHead`]).
   Their layer-``d`` hidden states are kept. With ``draft_stop_threshold``, drafting stops early at the first draft
   the exit is not confident of (Draft & Verify's adaptive draft exiting), so unlikely drafts cost nothing; with
   ``early_draft_exits`` too, each draft comes from the first confident exit, and a position left at a shallower
   exit is carried up with the next deeper one ([`LaggingPositions`]). The last draft's own layers run in step 2.
2. Verify. Layers ``d+1..L`` run once on those ``g + 1`` hidden states (the lower layers' cache is already there), and
   the full model's logits decide how many drafts to keep. Positions at different depths join the pass as it reaches
   them.
3. Crop. Every layer's cache is cut back to the kept positions.

Nothing is recomputed: each position passes each layer once per cycle. transformers' ``assistant_early_exit``
instead keeps a second cache and re-runs layers ``1..d`` in the verifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .decoding import DecodeOutput, DecodeStats, DecodingState
from .drafter import ExitDrafter
from .stack import DecoderStack
from .tokens import SamplingSettings
from .verifier import Verifier
from .vocab import SubsetHead

# One import path, the top level: `from soft_peft import self_speculative_generate`
__all__ = ["SpeculativeStats", "check_speculative_settings"]


@dataclass
class SpeculativeStats(DecodeStats):
    """Counters of one ``self_speculative_generate`` call, with the shared ones of [`DecodeStats`].

    Attributes:
        draft_exit: The drafting exit.
        cycles: Draft-then-verify cycles run.
        drafted: Draft tokens proposed, summed over unfinished rows.
        accepted: Draft tokens kept, summed over unfinished rows.
        acceptance_rate: ``accepted / drafted`` (0 when nothing was drafted).
        draft_stops: Cycles whose drafting ended early at an unconfident draft (``draft_stop_threshold``).
        drafts_by_exit: Drafted tokens (summed over unfinished rows) per exit that proposed them.
    """

    draft_exit: int
    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float = 0.0
    draft_stops: int = 0
    drafts_by_exit: dict[int, int] = field(default_factory=dict)


def check_speculative_settings(
    draft_exit: int,
    num_layers: int,
    num_draft_tokens: int | str = "adaptive",
    draft_stop_threshold: float | None = None,
    early_draft_exits: Sequence[int] = (),
) -> None:
    """Check [`self_speculative_generate`]'s drafting settings against a model's depth, before it is loaded.

    Args:
        draft_exit, num_draft_tokens, draft_stop_threshold, early_draft_exits: As for [`self_speculative_generate`].
        num_layers: The model's number of decoder layers ``L``.

    Raises:
        ValueError: naming the setting, its valid range and the value given.
    """
    early_draft_exits = list(early_draft_exits)
    if isinstance(draft_exit, bool) or not isinstance(draft_exit, int) or not 1 <= draft_exit < num_layers:
        raise ValueError(
            f"`draft_exit` must be an int in 1..{num_layers - 1} (the model has {num_layers} layers and the last one "
            f"verifies), got {draft_exit!r}."
        )
    if num_draft_tokens != "adaptive" and (
        isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1
    ):
        raise ValueError(f"`num_draft_tokens` must be an int >= 1 or 'adaptive', got {num_draft_tokens!r}.")
    if draft_stop_threshold is not None and not 0 <= draft_stop_threshold < 1:
        raise ValueError(f"`draft_stop_threshold` must be in [0, 1) or None, got {draft_stop_threshold!r}.")
    if not early_draft_exits:
        return
    if draft_stop_threshold is None:
        raise ValueError(
            "`early_draft_exits` needs `draft_stop_threshold`: it decides when an early exit is confident enough to "
            "draft."
        )
    valid = all(isinstance(k, int) and not isinstance(k, bool) for k in early_draft_exits)
    if not valid or early_draft_exits != sorted(set(early_draft_exits)) or not 1 <= early_draft_exits[0]:
        raise ValueError(f"`early_draft_exits` must be increasing ints >= 1, got {early_draft_exits!r}.")
    if early_draft_exits[-1] >= draft_exit:
        raise ValueError(f"`early_draft_exits` must lie below `draft_exit` ({draft_exit}), got {early_draft_exits}.")


@torch.inference_mode()
def self_speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    draft_exit: int,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int | str = "adaptive",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    max_draft_tokens: int = 12,
    generator: torch.Generator | None = None,
    draft_vocab: torch.Tensor | Sequence[int] | None = None,
    draft_stop_threshold: float | None = None,
    early_draft_exits: Sequence[int] = (),
) -> DecodeOutput[SpeculativeStats]:
    """Generate with exit ``draft_exit`` drafting and the full model verifying, sharing one KV cache.

    Greedy output is token-identical to ``model.generate(input_ids, do_sample=False, ...)``; sampled output follows
    the full model's distribution (speculative rejection sampling). In a batch, a cycle keeps the smallest number of
    accepted drafts over the unfinished rows, so every row stays exact and the cache stays rectangular.

    Args:
        model: A causal LM of a supported family (see [`DecoderStack`]), possibly PEFT-wrapped.
        input_ids: ``(B, T)`` prompts, left-padded for ``B > 1``.
        draft_exit: Exit that drafts, in ``1..L-1``.
        max_new_tokens: Number of tokens to generate (>= 1).
        attention_mask: ``(B, T)`` padding mask; required when a batch contains padding.
        num_draft_tokens: Drafts per cycle, or ``"adaptive"``: chosen each cycle from the running acceptance rate by
            [`choose_draft_length`].
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature, applied to draft and target alike.
        top_p: Nucleus sampling mass, applied to draft and target alike.
        eos_token_id: EOS id(s); default the model's ``generation_config``.
        pad_token_id: Written after a row's EOS; default ``generation_config.pad_token_id``, else the EOS id.
        max_draft_tokens: Upper bound of the adaptive draft length.
        generator: Random generator for sampling.
        draft_vocab: Token ids the draft exit may propose (from [`frequent_token_ids`]); only their rows of the head
            are computed while drafting. Verification still scores the whole vocabulary, so greedy output stays
            identical to ``generate`` and sampling stays exact; a token outside the subset just cannot be drafted.
        draft_stop_threshold: End a cycle's drafting at the first draft whose max probability at the draft exit (on
            ``draft_vocab`` when given) is not above this, in [0, 1); that draft is dropped. It only decides how many
            drafts are verified, so outputs stay exact. ``None``: always draft the chosen length.
        early_draft_exits: Exits below ``draft_exit`` to try first, in order: each draft comes from the first exit
            (these, then ``draft_exit``) confident above ``draft_stop_threshold``, so easy tokens are drafted
            cheaper. Positions drafted at different depths are carried up together before a later draft or the
            verifier attends to them, so no layer runs twice. Needs ``draft_stop_threshold``.

    Returns:
        [`DecodeOutput`] with ``.sequences`` ``(B, T + new_tokens)`` and ``.stats`` ([`SpeculativeStats`]).

    Raises:
        ValueError: for ``draft_exit`` outside ``1..L-1``, ``max_new_tokens < 1``, bad sampling settings, padding
            without an attention mask, ``draft_stop_threshold`` outside [0, 1), or ``early_draft_exits`` that are not
            increasing exits below ``draft_exit`` or come without ``draft_stop_threshold``.
    """
    stack = DecoderStack(model)
    early_draft_exits = list(early_draft_exits)
    check_speculative_settings(draft_exit, stack.num_layers, num_draft_tokens, draft_stop_threshold, early_draft_exits)
    sampling = SamplingSettings(do_sample, temperature, top_p, generator)
    longest_draft = max_draft_tokens if num_draft_tokens == "adaptive" else num_draft_tokens
    state = DecodingState(
        stack, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, extra_positions=longest_draft + 1
    )
    subset = None if draft_vocab is None else SubsetHead(stack.head, draft_vocab)
    drafter = ExitDrafter(
        state, [*early_draft_exits, draft_exit], sampling, num_draft_tokens, max_draft_tokens, draft_stop_threshold,
        subset,
    )  # fmt: skip
    verifier, stats = Verifier(sampling), SpeculativeStats(draft_exit=draft_exit)
    done = state.prefill(sampling)
    while not done:
        active, rows = state.writer.unfinished.clone(), int(state.writer.unfinished.sum())
        proposal = drafter.propose(drafter.length())
        # Verify: carry every position up through the last layer, each from its own depth, in shared passes
        upper = proposal.lagging.advance_all(stack.num_layers, proposal.start + proposal.length, state.run)
        new_tokens = verifier.new_tokens(proposal, state.logits_from_raw(upper), active)  # (B, kept + 1)
        kept = new_tokens.shape[1] - 1
        # Crop every layer back to x0 and the kept drafts; the last new token is the next cycle's x0
        state.crop(proposal.start + kept + 1)
        drafter.update(kept, proposal.length)
        stats.cycles += 1
        stats.drafted += proposal.length * rows
        stats.accepted += kept * rows
        done = state.writer.extend(new_tokens)
    stats.draft_stops, stats.drafts_by_exit = drafter.stops, drafter.drafts_by_exit
    stats.acceptance_rate = stats.accepted / stats.drafted if stats.drafted else 0.0
    return state.finish(stats)
