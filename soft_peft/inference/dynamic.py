"""Instance-aware dynamic inference: each token leaves at the first exit confident enough.

A token exits at layer ``e`` when the confidence of exit ``e``'s distribution passes that exit's threshold; later
tokens still attend to every layer, so the skipped layers ``e+1..L`` of the exited position need keys and values.
Two ways to fill them (``kv_fill``):

- ``"recompute"`` (EE-LLM style, default): the exited position keeps its layer-``e`` state, and the next token that
  goes deeper carries it along through the layers it needs, in the same batched pass. The cache ends up exactly what
  the full model computes; the extra positions ride along in a multi-token pass, which costs little when decoding is
  bound by reading weights.
- ``"propagate"`` (CALM style): right after the exit, the layer-``e`` state is fed to the attention block of every
  skipped layer to make its keys and values (no MLP, about a third of a layer each). Cheap, but approximate: the
  skipped layers see a copied state, not their true input.

Confidence checks are not free: a full-vocabulary head costs a few layers on CPU, so only the given exits are checked
(by default at most three recorded exits in the upper half), and an exit whose threshold is 1.0 is never checked.
With ``check_vocab`` an exit is first checked on a frequent-token slice of the head (see [`SubsetHead`]), and the full
head runs only to confirm a pass. Removing tokens from a softmax only raises the others' shares, so the pre-check never
lets a token exit that the full check would keep; it can only skip an exit whose top token lies outside the slice.
With ``exit_on_subset=True`` the slice decides alone: an exit that passes on it emits the slice's top token and the
full head never runs below the last layer. That trades exactness of the rule for speed (on a small model the full head
costs several layers): a token outside the slice can only be produced by the last layer, and confidence ignores the
mass outside the slice. ``thresholds=1.0`` still reproduces greedy ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..exits import parse_exit_layers, recorded_exit_layers
from .decoding import DecodeOutput, DecodeStats, DecodingState
from .stack import DecoderStack, LaggingPositions
from .tokens import CONFIDENCES, SamplingSettings, exit_confidence
from .vocab import SubsetHead

# One import path, the top level: `from soft_peft import dynamic_generate`
__all__ = ["DynamicStats", "check_dynamic_settings", "default_dynamic_exits", "dynamic_exit_thresholds"]

_KV_FILLS = ("recompute", "propagate")
_MAX_DEFAULT_CHECKS = 3


@dataclass
class DynamicStats(DecodeStats):
    """Counters of one ``dynamic_generate`` call, with the shared ones of [`DecodeStats`].

    Attributes:
        exits_taken: ``(new_tokens,)`` the layer each generated position exited at (the whole batch exits together);
            not to be confused with the ``exits`` argument, the exits that may be taken.
        average_depth: Mean of ``exits_taken``.
        checks: Confidence checks at non-final exits (on the vocabulary subset when one is given).
        full_checks: Of those, the ones that ran the full-vocabulary head.
    """

    exits_taken: torch.Tensor
    average_depth: float
    checks: int = 0
    full_checks: int = 0


def default_dynamic_exits(num_layers: int, recorded_exits: Sequence[int] | None = None) -> list[int]:
    """The exits [`dynamic_generate`] checks when none are given: up to three of the recorded exits (else of the
    default ones) in the upper half, below the last layer, spread evenly.

    Args:
        num_layers: The model's number of decoder layers ``L``.
        recorded_exits: The exits it was trained with (``recorded_exit_layers(model)``), or ``None``.

    Returns:
        The exits, ascending.
    """
    candidates = list(recorded_exits) if recorded_exits else parse_exit_layers(None, num_layers)
    upper = [k for k in candidates if num_layers / 2 <= k < num_layers]
    if len(upper) <= _MAX_DEFAULT_CHECKS:
        return upper
    picks = {round(i * (len(upper) - 1) / (_MAX_DEFAULT_CHECKS - 1)) for i in range(_MAX_DEFAULT_CHECKS)}
    return [upper[i] for i in sorted(picks)]


def dynamic_exit_thresholds(
    num_layers: int,
    exits: Sequence[int] | str | None = None,
    thresholds: float | Sequence[float] = 0.9,
    recorded_exits: Sequence[int] | None = None,
) -> dict[int, float]:
    """Resolve [`dynamic_generate`]'s exits and thresholds against a model's depth, before it is loaded.

    Args:
        num_layers: The model's number of decoder layers ``L``.
        exits, thresholds: As for [`dynamic_generate`].
        recorded_exits: The exits the model was trained with, for the default exits ([`default_dynamic_exits`]).

    Returns:
        ``{exit: threshold}`` for each exit below the last layer, ascending (1.0: never checked).

    Raises:
        ValueError: for exits outside ``1..L``, a threshold outside (0, 1], or a threshold count that does not match
            the exits.
    """
    if exits is None:
        checked = default_dynamic_exits(num_layers, recorded_exits)
    else:  # the last layer takes no threshold: it is the fallback
        checked = [k for k in parse_exit_layers(exits, num_layers, "exits") if k < num_layers]
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        values = [float(thresholds)] * len(checked)
    else:
        values = [float(t) for t in thresholds]
        if len(values) != len(checked):
            raise ValueError(
                f"Got {len(values)} thresholds for the {len(checked)} exits {checked} (the last layer takes none); "
                "pass one float for all, or one per exit."
            )
    bad = [t for t in values if not 0 < t <= 1]
    if bad:
        raise ValueError(f"Thresholds must be in (0, 1], got {bad}; 1.0 disables an exit.")
    return dict(zip(checked, values, strict=True))


def check_dynamic_settings(confidence: str, kv_fill: str, exit_on_subset: bool, has_check_vocab: bool) -> None:
    """Check [`dynamic_generate`]'s exit-rule settings.

    Args:
        confidence, kv_fill, exit_on_subset: As for [`dynamic_generate`].
        has_check_vocab: Whether ``check_vocab`` is given.

    Raises:
        ValueError: for an unknown ``confidence`` or ``kv_fill``, or ``exit_on_subset`` without ``check_vocab``.
    """
    if confidence not in CONFIDENCES:
        raise ValueError(f"`confidence` must be one of {CONFIDENCES}, got {confidence!r}.")
    if kv_fill not in _KV_FILLS:
        raise ValueError(f"`kv_fill` must be one of {_KV_FILLS}, got {kv_fill!r}.")
    if exit_on_subset and not has_check_vocab:
        raise ValueError(
            "`exit_on_subset=True` needs `check_vocab`: pass the ids to decide on, e.g. "
            "`frequent_token_ids(tokenizer, training_texts)`."
        )


class ExitRule:
    """Decides, at each checked exit in turn, whether the batch's token leaves there and which tokens it emits.

    Args:
        state: The call's [`DecodingState`].
        thresholds: ``{exit: threshold}`` of the checked exits (the last layer is not among them).
        confidence: See [`exit_confidence`].
        sampling: How tokens are chosen.
        subset: Pre-check (or, with ``exit_on_subset``, decide) on this slice of the head first.
        exit_on_subset: Let ``subset`` decide alone and emit its top token.
    """

    def __init__(self, state, thresholds, confidence, sampling, subset=None, exit_on_subset=False):
        self.state, self.thresholds, self.confidence, self.sampling = state, thresholds, confidence, sampling
        self.subset, self.exit_on_subset = subset, exit_on_subset
        self.checks = self.full_checks = 0

    def tokens(self, hidden: torch.Tensor, layer: int) -> torch.Tensor | None:
        """The tokens ``(B,)`` emitted at ``layer`` from its states ``(B, H)``, or ``None`` when the batch goes on."""
        if layer == self.state.stack.num_layers:
            return self.sampling.choose(self.state.logits_from_raw(hidden))[0]
        self.checks += 1
        if self.subset is not None:
            # Dropping tokens from a softmax only raises the others' shares: failing here means failing in full
            subset_logits = self.state.logits_from_raw(hidden, self.subset)
            if not self._passes(subset_logits, layer):
                return None
            if self.exit_on_subset:
                return self.subset.token_ids[self.sampling.choose(subset_logits)[0]]
        self.full_checks += 1
        logits = self.state.logits_from_raw(hidden)
        return self.sampling.choose(logits)[0] if self._passes(logits, layer) else None

    def _passes(self, logits: torch.Tensor, layer: int) -> bool:
        return self.state.all_unfinished(exit_confidence(logits, self.confidence) > self.thresholds[layer])


def _exit_token(
    state: DecodingState, rule: ExitRule, lagging: LaggingPositions, kv_fill: str
) -> tuple[torch.Tensor, int]:
    """Run the next position up to the first exit ``rule`` lets it leave at; return its tokens and that layer.

    The skipped layers of an early-exited position are filled as ``kv_fill`` says: later (``lagging``) or now.
    """
    position = state.position
    hidden, layer = state.embed(state.writer.last[:, None], position), 0  # (B, 1, H)
    for stop in [*sorted(rule.thresholds), state.stack.num_layers]:
        hidden, layer = lagging.advance(hidden, layer, stop, position, state.run), stop
        tokens = rule.tokens(hidden[:, -1], layer)
        if tokens is not None:
            break
    num_layers = state.stack.num_layers
    if layer == num_layers:
        lagging.clear()  # every earlier position was carried to the top
    elif kv_fill == "recompute":
        lagging.append(hidden, layer)
    else:
        state.fill_kv(hidden, layer + 1, num_layers, position)
    return tokens, layer


@torch.inference_mode()
def dynamic_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    exits: Sequence[int] | str | None = None,
    thresholds: float | Sequence[float] = 0.9,
    max_new_tokens: int = 128,
    attention_mask: torch.Tensor | None = None,
    confidence: str = "max_prob",
    kv_fill: str = "recompute",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    check_vocab: torch.Tensor | Sequence[int] | None = None,
    exit_on_subset: bool = False,
) -> DecodeOutput[DynamicStats]:
    """Generate with a per-token exit: each token leaves at the first exit whose confidence exceeds its threshold.

    The prompt and the first new token always use the full depth. Batch rule: a batch step exits at an exit only when
    every unfinished row is confident there, so the batch shares one depth per step (and one cache length per layer).
    ``thresholds=1.0`` never exits early and reproduces greedy ``generate`` exactly.

    Args:
        model: A causal LM of a supported family (see [`DecoderStack`]), possibly PEFT-wrapped.
        input_ids: ``(B, T)`` prompts, left-padded for ``B > 1``.
        exits: Exits to check (list, ``"12,16"`` or ``"start:stop:step"``); default [`default_dynamic_exits`].
        thresholds: One float for all exits, or one per exit, each in (0, 1]; a token exits when its confidence is
            strictly greater. 1.0 disables an exit (and skips its head).
        max_new_tokens: Number of tokens to generate (>= 1).
        attention_mask: ``(B, T)`` padding mask; required when a batch contains padding.
        confidence: ``"max_prob"`` or ``"margin"`` (see [`exit_confidence`]).
        kv_fill: ``"recompute"`` (EE-LLM, exact cache) or ``"propagate"`` (CALM, approximate); see the module doc.
        do_sample: Sample from the exit's distribution instead of taking its argmax.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        eos_token_id: EOS id(s); default the model's ``generation_config``.
        pad_token_id: Written after a row's EOS; default ``generation_config.pad_token_id``, else the EOS id.
        generator: Random generator for sampling.
        check_vocab: Token ids to pre-check confidence on (from [`frequent_token_ids`]); the full head then runs only
            to confirm a pass, and the exit rule is never loosened (see the module doc).
        exit_on_subset: Let ``check_vocab`` decide early exits alone and emit its top token there, without the full
            head: faster but approximate (see the module doc). Needs ``check_vocab``.

    Returns:
        [`DecodeOutput`] with ``.sequences`` and ``.stats`` ([`DynamicStats`]: per-token ``exits_taken``,
        ``average_depth``, ...).

    Raises:
        ValueError: for a threshold outside (0, 1], a threshold count that does not match the exits, an unknown
            ``confidence`` or ``kv_fill``, ``max_new_tokens < 1``, padding without an attention mask, or
            ``exit_on_subset`` without ``check_vocab``.
    """
    stack = DecoderStack(model)
    resolved = dynamic_exit_thresholds(stack.num_layers, exits, thresholds, recorded_exit_layers(stack.model))
    thresholds = {k: t for k, t in resolved.items() if t < 1.0}  # an exit at 1.0 is never checked
    check_dynamic_settings(confidence, kv_fill, exit_on_subset, check_vocab is not None)
    sampling = SamplingSettings(do_sample, temperature, top_p, generator)
    subset = None if check_vocab is None else SubsetHead(stack.head, check_vocab)
    state = DecodingState(stack, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    rule = ExitRule(state, thresholds, confidence, sampling, subset, exit_on_subset)
    lagging = LaggingPositions()  # recompute mode: positions whose upper layers are not cached yet
    done, exits_taken = state.prefill(sampling), [stack.num_layers]
    while not done:
        tokens, layer = _exit_token(state, rule, lagging, kv_fill)
        exits_taken.append(layer)
        done = state.writer.append(tokens)
    taken = torch.tensor(exits_taken[: state.writer.count])
    stats = DynamicStats(
        exits_taken=taken, average_depth=float(taken.float().mean()), checks=rule.checks, full_checks=rule.full_checks
    )
    return state.finish(stats)
