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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .stack import DecoderStack, LaggingPositions, check_generation_inputs
from .tokens import (
    SequenceWriter,
    check_sampling,
    choose_tokens,
    exit_confidence,
    resolve_special_tokens,
    sampling_probs,
)
from .vocab import SubsetHead

__all__ = ["SpeculativeOutput", "SpeculativeStats", "choose_draft_length", "self_speculative_generate"]

# Pseudo-counts behind the adaptive draft length before any evidence: acceptance 0.75
_PRIOR_ACCEPTED, _PRIOR_REJECTED = 3.0, 1.0


@dataclass
class SpeculativeStats:
    """Counters of one ``self_speculative_generate`` call.

    Attributes:
        draft_exit: The drafting exit.
        cycles: Draft-then-verify cycles run.
        drafted: Draft tokens proposed, summed over unfinished rows.
        accepted: Draft tokens kept, summed over unfinished rows.
        acceptance_rate: ``accepted / drafted`` (0 when nothing was drafted).
        draft_stops: Cycles whose drafting ended early at an unconfident draft (``draft_stop_threshold``).
        drafts_by_exit: Drafted tokens (summed over unfinished rows) per exit that proposed them.
        new_tokens: Generated positions (the length of the new part of ``sequences``).
        seconds: Wall time of the call.
        tokens_per_second: ``new_tokens * batch / seconds``.
        layer_forwards: Per decoder layer (index 0 is layer 1), how many times it ran (prefill included).
        head_forwards: Calls of the final norm + LM head.
    """

    draft_exit: int
    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float = 0.0
    draft_stops: int = 0
    drafts_by_exit: dict[int, int] = field(default_factory=dict)
    new_tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    layer_forwards: list[int] = field(default_factory=list)
    head_forwards: int = 0


@dataclass
class SpeculativeOutput:
    """Result of ``self_speculative_generate``.

    Attributes:
        sequences: ``(B, T + new_tokens)`` prompts and generated tokens, as ``generate`` returns them.
        stats: The [`SpeculativeStats`].
    """

    sequences: torch.Tensor
    stats: SpeculativeStats


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


def _head_cost_in_layers(stack: DecoderStack) -> float:
    # Decoding is bound by reading weights: compare the head's size with one layer's
    head = stack.head.lm_head.weight.numel()
    layer = sum(p.numel() for p in stack.layers[0].parameters())
    return head / max(layer, 1)


def _validate(draft_exit, num_layers, num_draft_tokens, draft_stop_threshold, early_draft_exits) -> None:
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


def _accept_sampled(drafts, draft_probs, target_probs, generator):
    """Speculative rejection sampling: per-row count of kept drafts ``(B,)`` and per-position replacement tokens."""
    # drafts (B, g); draft_probs (B, g, V); target_probs (B, g + 1, V)
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
) -> SpeculativeOutput:
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
        [`SpeculativeOutput`] with ``.sequences`` ``(B, T + new_tokens)`` and ``.stats``.

    Raises:
        ValueError: for ``draft_exit`` outside ``1..L-1``, ``max_new_tokens < 1``, bad sampling settings, padding
            without an attention mask, ``draft_stop_threshold`` outside [0, 1), or ``early_draft_exits`` that are not
            increasing exits below ``draft_exit`` or come without ``draft_stop_threshold``.
    """
    started = time.perf_counter()
    stack = DecoderStack(model)
    num_layers = stack.num_layers
    early_draft_exits = list(early_draft_exits)
    _validate(draft_exit, num_layers, num_draft_tokens, draft_stop_threshold, early_draft_exits)
    exits = [*early_draft_exits, draft_exit]
    if do_sample:
        check_sampling(temperature, top_p)
    eos_ids, pad_id = resolve_special_tokens(stack.model, eos_token_id, pad_token_id)
    input_ids = input_ids.to(stack.model.device)
    padding_mask = check_generation_inputs(input_ids, attention_mask, max_new_tokens, pad_id)
    batch, prompt_length = input_ids.shape
    longest_draft = max_draft_tokens if num_draft_tokens == "adaptive" else num_draft_tokens
    full_mask = None
    if padding_mask is not None:
        ones = padding_mask.new_ones(batch, max_new_tokens + longest_draft + 1)
        full_mask = torch.cat([padding_mask, ones], dim=1)
    stats = SpeculativeStats(draft_exit=draft_exit, layer_forwards=[0] * num_layers)
    head_cost = _head_cost_in_layers(stack)
    subset = None if draft_vocab is None else SubsetHead(stack, draft_vocab)
    draft_head_cost = head_cost if subset is None else head_cost * subset.size / subset.vocab_size
    sample = (do_sample, temperature, top_p, generator)
    writer = SequenceWriter(input_ids, max_new_tokens, eos_ids, pad_id)
    cache = stack.new_cache()

    def run(hidden, first, last, inputs):
        for index in range(first - 1, last):
            stats.layer_forwards[index] += 1
        return stack.run_layers(hidden, first, last, inputs, cache)

    def head(hidden):
        stats.head_forwards += 1
        return stack.logits(hidden)

    def run_at(hidden, first, last, position):  # `run` for a chunk starting at `position`
        return run(hidden, first, last, stack.step_inputs(full_mask, position, hidden.shape[1], batch))

    def draft(hidden):  # (B, H) -> tokens (B,), when sampling their (B, V) distribution, and whether to keep them
        if subset is None:
            logits = head(hidden)
        else:
            stats.head_forwards += 1
            logits = subset.logits(hidden)
        tokens, probs = choose_tokens(logits, *sample)
        keep = True
        if draft_stop_threshold is not None:
            keep = bool((exit_confidence(logits)[writer.unfinished] > draft_stop_threshold).all())
        if subset is None:
            return tokens, probs, keep
        return subset.token_ids[tokens], None if probs is None else subset.to_vocab(probs), keep

    # Prefill: the whole prompt through every layer
    inputs = stack.step_inputs(full_mask, 0, prompt_length, batch)
    hidden = run(stack.embed(input_ids, inputs), 1, num_layers, inputs)
    done = writer.append(choose_tokens(head(hidden[:, -1]), *sample)[0])
    accepted_total, rejections = _PRIOR_ACCEPTED, _PRIOR_REJECTED
    while not done:
        if num_draft_tokens == "adaptive":
            acceptance = accepted_total / (accepted_total + rejections)
            length = choose_draft_length(
                acceptance, draft_exit, num_layers, head_cost, max_draft_tokens, draft_head_cost
            )
        else:
            length = num_draft_tokens
        length = min(length, max_new_tokens - writer.count - 1)  # a cycle yields at most length + 1 tokens
        start = prompt_length + writer.count - 1  # position of x0, the last token (not cached yet)
        active = writer.unfinished.clone()
        rows = int(active.sum())

        # 1. Draft one position at a time from the first confident exit; x0 and every draft keep their state there
        token, lagging, drafts, draft_probs = writer.last, LaggingPositions(), [], []
        for offset in range(length + 1):
            inputs = stack.step_inputs(full_mask, start + offset, 1, batch)
            state, layer = stack.embed(token[:, None], inputs), 0  # (B, 1, H)
            if offset == length:  # the last position is only verified
                lagging.append(state, layer)
                break
            for exit_layer in exits:
                state, layer = lagging.advance(state, layer, exit_layer, start + offset, run_at), exit_layer
                token, probs, keep = draft(state[:, -1])
                if keep:
                    break
            lagging.append(state, layer)
            if not keep:  # no exit trusts this draft: verify what is drafted so far
                length = offset
                stats.draft_stops += 1
                break
            drafts.append(token)
            draft_probs.append(probs)
            stats.drafts_by_exit[layer] = stats.drafts_by_exit.get(layer, 0) + rows

        # 2. Verify: carry every position up through layer L (each from its own depth), in shared passes
        newest, depth = lagging.states.pop(), lagging.depths.pop()
        newest = lagging.advance(newest, depth, num_layers, start + length, run_at)
        upper = torch.cat([*lagging.states, newest], dim=1)  # (B, g + 1, H)
        target_logits = head(upper)  # (B, g + 1, V)
        draft_tokens = torch.stack(drafts, dim=1) if drafts else target_logits.new_zeros(batch, 0, dtype=torch.long)
        if do_sample:
            target_probs = sampling_probs(target_logits, temperature, top_p)
            draft_prob_tensor = torch.stack(draft_probs, dim=1) if draft_probs else target_probs.new_zeros(batch, 0, 1)
            kept_per_row, replacements = _accept_sampled(draft_tokens, draft_prob_tensor, target_probs, generator)
        else:
            replacements = target_logits.argmax(-1)  # (B, g + 1)
            kept_per_row = (draft_tokens == replacements[:, :length]).long().cumprod(-1).sum(-1)
        kept = int(kept_per_row[active].min())
        # Rows that accepted more than `kept` drafts continue with their accepted draft: still an exact sample
        bonus = replacements[:, kept]
        if kept < length:
            bonus = torch.where(kept_per_row > kept, draft_tokens[:, kept], bonus)
        new_tokens = torch.cat([draft_tokens[:, :kept], bonus[:, None]], dim=1)

        # 3. Crop every layer back to x0 and the kept drafts; the bonus token is the next cycle's x0
        stack.crop(cache, 1, num_layers, start + kept + 1)
        stats.cycles += 1
        stats.drafted += length * rows
        stats.accepted += kept * rows
        accepted_total += kept
        rejections += 1 if kept < length else 0
        for column in new_tokens.unbind(dim=1):
            done = writer.append(column)
            if done:
                break

    stats.seconds = time.perf_counter() - started
    stats.new_tokens = writer.count
    stats.acceptance_rate = stats.accepted / stats.drafted if stats.drafted else 0.0
    stats.tokens_per_second = writer.count * batch / stats.seconds
    return SpeculativeOutput(sequences=writer.sequences(), stats=stats)
