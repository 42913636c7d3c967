"""Attach the SoFT loss to a causal LM instance, and the public [`SortedLossWrapper`] module.

The exit losses are computed *inside the model's own forward* (an instance-level wrapper of ``forward``, the way TRL's
``add_fused_lm_head`` works), so DeepSpeed ZeRO-3 and FSDP see every use of the norm and head within the root module's
forward, where their parameters are gathered. Calling ``lm_head`` from outside that forward is a known FSDP failure.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

from torch import nn

from .checkpoints import save_adapter_exit_layers, saves_an_adapter
from .exit_forward import ExitLossSettings, SortedExitOutput, sorted_exit_forward
from .exit_head import find_exit_head, unwrap_model
from .exits import exit_layers_as_written, record_exit_layers, recorded_exit_layers
from .layer_dropout import LayerDropout, install_layer_dropout, layer_dropout_state
from .loss import DEFAULT_EXIT_LOSS_WEIGHTS, DEFAULT_VOCAB_CHUNK_SIZE, exit_loss_weights
from .schedule import ExitSchedule

__all__ = ["SortedExitOutput", "SortedLossWrapper", "add_sorted_exit_loss", "exit_loss_weights_of"]

# The settings of a model whose forward already carries the SoFT loss; also marks it, so it is never wrapped twice
_PATCHED = "_soft_peft_exit_loss"


def add_sorted_exit_loss(
    model: nn.Module,
    exit_layers: str | Sequence[int] | None = None,
    exit_loss_weights_spec: str | Sequence[float] = DEFAULT_EXIT_LOSS_WEIGHTS,
    final_norm: nn.Module | None = None,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    token_weighting: str = "nll",
    with_last_layer_metrics: bool = False,
    kernel: str = "auto",
    schedule: ExitSchedule | None = None,
    exit_head_grad: str = "all",
    exit_distill_weight: float = 0.0,
    exit_distill_temperature: float = 1.0,
    layer_dropout: LayerDropout | None = None,
) -> list[int]:
    """Give a causal LM instance the SoFT loss: ``model(..., labels=y, soft_exit_loss=True)`` returns a
    [`SortedExitOutput`].

    Only this instance's ``forward`` is wrapped; without ``soft_exit_loss=True`` it calls the previous forward, so
    generation, TRL's fused head and PEFT are unchanged. The exits trained (those whose weight is above 0) are
    recorded as ``soft_exit_layers`` in the config.
    Calling it again updates the settings rather than wrapping twice.

    Args:
        model: A transformers causal LM or a PEFT model around one.
        exit_layers: See [`~soft_peft.exits.parse_exit_layers`]; ``None`` is the paper's 8 evenly spaced exits.
        exit_loss_weights_spec: See [`~soft_peft.loss.exit_loss_weights`]; default ``"last:0.75"``. Explicit
            weights follow the exits in the order given (``exit_layers=[30, 9]``, weights ``[1, 0]``: exit 30 gets 1).
        final_norm: The final norm, where [`~soft_peft.exits.find_final_norm`] cannot tell it.
        vocab_chunk_size: Vocabulary columns per projection tile of the head kernel.
        token_weighting: ``"nll"``, or ``"dft"`` for TRL's DFT loss.
        with_last_layer_metrics: Also report the last layer's token accuracy and entropy (``SFTTrainer``'s metrics),
            with a no-grad head pass when the last layer is not an exit.
        kernel: Head kernel, ``"auto"``, ``"trl"`` or ``"torch"`` (see [`~soft_peft.loss.sorted_exit_loss`]).
        schedule: An [`~soft_peft.schedule.ExitSchedule`] (ramp / rotation over optimizer steps). A training forward
            then needs ``soft_exit_step=`` the optimizer steps taken; without a step (evaluation) every exit is
            computed at its base weight.
        exit_head_grad: ``"all"`` (default: every exit updates the shared final norm and head) or ``"last"``: the
            early exits use them without updating them; their gradient still reaches the layers below. "Last" is the
            deepest exit in ``exit_layers`` (the model's last layer by default).
        exit_distill_weight: ``lambda`` in ``[0, 1]``: each early exit's loss becomes ``(1 - lambda) * CE +
            lambda * T^2 * KL(p_last || p_exit)`` on the labelled tokens, the last exit detached (see
            [`~soft_peft.loss.sorted_exit_loss`]); ``0`` (default) is off.
        exit_distill_temperature: ``T > 0`` of the distillation term.
        layer_dropout: A [`~soft_peft.layer_dropout.LayerDropout`] (LayerSkip's per-sample stochastic depth) for the
            training forwards; ``None`` or rate 0 (default) is off, and leaves the layers untouched.

    Returns:
        The resolved exit layers, ascending (zero-weight ones included; they are computed but not recorded).

    Raises:
        ValueError: for an encoder-decoder model or one whose head or norm cannot be found, and for invalid exits or
            weights.
    """
    base = unwrap_model(model)
    head = find_exit_head(base, final_norm=final_norm)  # fail now, not at the first step
    written = exit_layers_as_written(exit_layers, head.num_layers)
    layers = sorted(written)
    # Explicit weights follow the exits in the order the user wrote them, not the sorted order the loss runs in
    weights = exit_loss_weights(exit_loss_weights_spec, layers, written_order=written)
    settings = ExitLossSettings(  # checks every value before the model is touched
        exit_layers=tuple(layers),
        weights=tuple(weights),
        final_norm=final_norm,
        vocab_chunk_size=vocab_chunk_size,
        token_weighting=token_weighting,
        with_last_layer_metrics=with_last_layer_metrics,
        kernel=kernel,
        schedule=schedule,
        head_grad=exit_head_grad,
        distill_weight=float(exit_distill_weight),
        distill_temperature=float(exit_distill_temperature),
        layer_dropout=layer_dropout,
    )
    if layer_dropout is not None and layer_dropout.enabled:
        install_layer_dropout(base)
    if weights[-1] == 0:
        warnings.warn(
            f"exit_loss_weights gives the deepest exit, layer {layers[-1]}, weight 0: it is not trained, and only "
            f"exits {[k for k, w in zip(layers, weights, strict=True) if w > 0]} are recorded as trained.",
            stacklevel=2,
        )
    # Only the exits the loss trains are recorded: a later `soft-peft generate --exit_layer` on another one warns
    record_exit_layers(base, [k for k, w in zip(layers, weights, strict=True) if w > 0])
    already_wrapped = getattr(base, _PATCHED, None) is not None
    setattr(base, _PATCHED, settings)  # the forward reads it at every call: a second call only updates it
    if already_wrapped:
        return layers
    previous_forward = base.forward

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(base).forward)
    def forward(
        *args,
        soft_exit_loss=False,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        soft_exit_step=None,
        **kwargs,
    ):
        if not soft_exit_loss:
            dropout_state = layer_dropout_state(base)
            if dropout_state is not None:  # a plain forward (generate, evaluation) never drops a layer
                dropout_state.clear()
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        if labels is None and shift_labels is None:
            raise ValueError("`soft_exit_loss=True` needs `labels` (use -100 for positions without a loss).")
        return sorted_exit_forward(
            base, args, kwargs, labels, shift_labels, num_items_in_batch, getattr(base, _PATCHED), soft_exit_step
        )

    base.forward = forward
    return layers


def exit_loss_weights_of(model: nn.Module) -> dict[int, float]:
    """The base weight of each exit of a model given the SoFT loss by [`add_sorted_exit_loss`].

    Args:
        model: The model (possibly wrapped by PEFT, DDP or DeepSpeed).

    Returns:
        ``{layer: weight}``, ascending layers, weights summing to 1 (before any schedule).

    Raises:
        ValueError: when the model has no SoFT loss.
    """
    settings = getattr(unwrap_model(model), _PATCHED, None)
    if settings is None:
        raise ValueError(f"{type(model).__name__} has no SoFT loss: call `add_sorted_exit_loss` on it first.")
    return dict(zip(settings.exit_layers, settings.weights, strict=True))


class SortedLossWrapper(nn.Module):
    """Attach the SoFT nested-exit loss to any transformers causal LM.

    ``wrapper(input_ids=..., attention_mask=..., labels=...)`` runs the model once and returns a
    [`SortedExitOutput`] whose ``loss`` is the weighted mean over exits of each exit's token cross-entropy and whose
    ``exit_losses`` is ``{layer: mean CE}``. Exit ``k`` is ``hidden_states[k]`` through the model's own final norm and
    shared LM head (with its softcapping / logit scale); the last exit is the model's ordinary logits. Labels are
    shifted as in transformers and ``-100`` is ignored; only labelled positions reach the head, in chunks recomputed
    in backward, so no ``[batch, seq, vocab]`` tensor is held. Without labels it returns the model's plain output.

    Usable in a plain PyTorch loop or as the ``model`` of an HF ``Trainer``. No parameters are added;
    ``save_pretrained`` writes a vanilla transformers checkpoint (no wrapper prefix) with ``soft_exit_layers`` in
    ``config.json``, which plain ``AutoModelForCausalLM.from_pretrained`` reloads.

    Args:
        model: A decoder-only transformers causal LM, or a PEFT model around one (an encoder-decoder is refused).
        exit_layers: List of layers, ``"12,16,20"`` or ``"start:stop:step"``; ``None`` is the paper's 8 evenly spaced
            exits from ~30% depth to the last layer (see [`~soft_peft.exits.default_exit_layers`]).
        exit_loss_weights: ``"last:w"`` (the last exit keeps weight ``w``, the others share ``1 - w``; default
            ``"last:0.75"``, chosen by the quality study), ``"uniform"`` (the paper), ``"linear"`` (deeper exits weigh
            more) or one weight per exit, in the order ``exit_layers`` lists them; normalised to sum to 1 (see
            [`~soft_peft.loss.exit_loss_weights`]). Only exits with a weight above 0 are recorded as trained.
        final_norm: The final norm module, only for architectures where it cannot be found automatically.
        vocab_chunk_size: Vocabulary columns per head tile (memory/speed knob).
        schedule: An [`~soft_peft.schedule.ExitSchedule`] (exits ramped in, or a rotation of the early exits). Then
            pass ``step=`` (optimizer steps taken so far) to every training forward; every micro-batch of one
            optimizer step must get the same step.
        exit_head_grad: ``"all"`` (default) or ``"last"``: only the last exit updates the shared final norm and head
            (with a tied head, also the input embedding through it); the early exits still train the layers below.
        exit_distill_weight: ``lambda`` in ``[0, 1]``, default 0 (off): each early exit's loss becomes
            ``(1 - lambda) * CE + lambda * T^2 * KL(p_last || p_exit)``, ``p_last`` detached; the output then carries
            ``exit_agreement``.
        exit_distill_temperature: ``T > 0`` of the distillation term (default 1).
        layer_dropout: A [`~soft_peft.layer_dropout.LayerDropout`]: in training forwards each sample skips decoder
            layer ``l`` with a probability rising with depth (LayerSkip); ``None`` (default) is off. With
            ``ramp_steps`` pass ``step=`` as for a schedule.

    Example:
        ```python
        model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        soft = SortedLossWrapper(model)  # exits [9, 12, ..., 30]
        out = soft(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        print({k: v.item() for k, v in out.exit_losses.items()})
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        exit_layers: str | Sequence[int] | None = None,
        exit_loss_weights: str | Sequence[float] = DEFAULT_EXIT_LOSS_WEIGHTS,
        final_norm: nn.Module | None = None,
        vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
        schedule: ExitSchedule | None = None,
        exit_head_grad: str = "all",
        exit_distill_weight: float = 0.0,
        exit_distill_temperature: float = 1.0,
        layer_dropout: LayerDropout | None = None,
    ):
        super().__init__()
        self.model = model
        self.exit_layers = add_sorted_exit_loss(
            model,
            exit_layers,
            exit_loss_weights,
            final_norm=final_norm,
            vocab_chunk_size=vocab_chunk_size,
            schedule=schedule,
            exit_head_grad=exit_head_grad,
            exit_distill_weight=exit_distill_weight,
            exit_distill_temperature=exit_distill_temperature,
            layer_dropout=layer_dropout,
        )

    @property
    def config(self):
        """The wrapped model's config (carries ``soft_exit_layers``)."""
        return unwrap_model(self.model).config

    def forward(self, *args, labels=None, num_items_in_batch=None, step=None, **kwargs):
        """Forward with the SoFT loss when ``labels`` are given (``step``: optimizer steps taken, for a schedule),
        else the model's own forward."""
        if labels is None:
            return self.model(*args, **kwargs)
        return self.model(
            *args,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            soft_exit_loss=True,
            soft_exit_step=step,
            **kwargs,
        )

    def save_pretrained(self, save_directory, **kwargs):
        """Save the wrapped model as a vanilla checkpoint with the exits in its ``config.json``, or as a PEFT adapter
        with the exits in ``soft_peft_config.json`` beside it (see [`~soft_peft.checkpoints.load_causal_lm`])."""
        result = self.model.save_pretrained(save_directory, **kwargs)
        if saves_an_adapter(self.model) and kwargs.get("is_main_process", True):
            save_adapter_exit_layers(save_directory, recorded_exit_layers(self.model))
        return result

    def state_dict(self, *args, **kwargs):
        """The wrapped model's state dict, without a wrapper prefix."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Load a (vanilla) state dict into the wrapped model."""
        return self.model.load_state_dict(state_dict, *args, **kwargs)
