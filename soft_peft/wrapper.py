"""Attach the SoFT loss to a causal LM instance, and the public [`SortedLossWrapper`] module.

The exit losses are computed *inside the model's own forward* (an instance-level wrapper of ``forward``, the way TRL's
``add_fused_lm_head`` works), so DeepSpeed ZeRO-3 and FSDP see every use of the norm and head within the root module's
forward, where their parameters are gathered. Calling ``lm_head`` from outside that forward is a known FSDP failure.
"""

from __future__ import annotations

import functools
import warnings

from torch import nn

from .checkpoints import save_adapter_exit_layers, saves_an_adapter
from .exit_forward import ResolvedExitLoss, sorted_exit_forward
from .exit_head import find_exit_head
from .exit_weights import exit_loss_weights
from .exits import exit_layers_as_written, record_exit_layers, recorded_exit_layers
from .layer_dropout import install_layer_dropout, layer_dropout_state
from .model_layout import unwrap_model
from .settings import SoFTSettings, soft_settings

# One import path, the top level: `from soft_peft import SortedLossWrapper, add_sorted_exit_loss`
__all__ = ["exit_loss_weights_of"]

# The resolved loss of a model whose forward already carries the SoFT loss; also marks it, so it is never wrapped twice
_PATCHED = "_soft_peft_exit_loss"


def _check_settings_type(settings) -> None:
    if settings is not None and not isinstance(settings, SoFTSettings):
        raise TypeError(
            f"settings must be a SoFTSettings (or None for the defaults), got {type(settings).__name__} {settings!r}. "
            "Pass single settings by name, e.g. SortedLossWrapper(model, exit_layers=[2, 4])."
        )


def _resolve(base: nn.Module, settings: SoFTSettings, final_norm, last_layer_metrics: bool, seed: int):
    """The settings against this model's depth: its exits (ascending) and their base weights, checked."""
    head = find_exit_head(base, final_norm=final_norm)  # fail now, not at the first step
    written = exit_layers_as_written(settings.exit_layers, head.num_layers)
    layers = sorted(written)
    # Explicit weights follow the exits in the order the user wrote them, not the sorted order the loss runs in
    weights = exit_loss_weights(settings.exit_loss_weights, layers, written_order=written)
    return ResolvedExitLoss(settings, tuple(layers), tuple(weights), final_norm, last_layer_metrics, seed)


def add_sorted_exit_loss(
    model: nn.Module,
    settings: SoFTSettings | None = None,
    *,
    final_norm: nn.Module | None = None,
    last_layer_metrics: bool = False,
    seed: int = 0,
) -> list[int]:
    """Give a causal LM instance the SoFT loss: ``model(..., labels=y, soft_exit_loss=True)`` returns a
    [`SortedExitOutput`].

    Only this instance's ``forward`` is wrapped; without ``soft_exit_loss=True`` it calls the previous forward, so
    generation, TRL's fused head and PEFT are unchanged. The exits trained (those whose weight is above 0) are
    recorded as ``soft_exit_layers`` in the config.
    Calling it again updates the settings rather than wrapping twice.

    Args:
        model: A transformers causal LM or a PEFT model around one.
        settings: The [`~soft_peft.settings.SoFTSettings`] (exits, weights, loss knobs, schedule, layer dropout);
            ``None`` is the defaults. With a schedule or a layer dropout ramp, a training forward needs
            ``soft_exit_step=`` the optimizer steps taken, and with an anneal also ``soft_exit_total_steps=`` the
            run's total optimizer steps; without a step (evaluation) every exit is computed at its base weight.
        final_norm: The final norm, where [`~soft_peft.model_layout.find_final_norm`] cannot tell it.
        last_layer_metrics: Also report the model's last layer's token accuracy and entropy (``SFTTrainer``'s
            metrics), with a no-grad head pass when the last layer is not an exit.
        seed: Seed of the layer dropout draws (``SoFTTrainer`` passes the run's ``seed``).

    Returns:
        The resolved exit layers, ascending (zero-weight ones included; they are computed but not recorded).

    Raises:
        TypeError: when ``settings`` is not a [`~soft_peft.settings.SoFTSettings`].
        ValueError: for an encoder-decoder model or one whose head or norm cannot be found, for exits outside the
            model's depth, a weight count that is not one per exit, and a schedule that trains nothing.
    """
    _check_settings_type(settings)
    settings = SoFTSettings() if settings is None else settings
    base = unwrap_model(model)
    resolved = _resolve(base, settings, final_norm, last_layer_metrics, seed)  # checked before the model is touched
    layers, weights = resolved.exit_layers, resolved.exit_loss_weights
    if resolved.layer_dropout.enabled:
        install_layer_dropout(base)
    trained = [k for k, w in zip(layers, weights, strict=True) if w > 0]
    if weights[-1] == 0:
        warnings.warn(
            f"exit_loss_weights gives the deepest exit, layer {layers[-1]}, weight 0: it is not trained, and only "
            f"exits {trained} are recorded as trained.",
            stacklevel=2,
        )
    # Only the exits the loss trains are recorded: a later `soft-peft generate --exit_layer` on another one warns
    record_exit_layers(base, trained)
    already_wrapped = getattr(base, _PATCHED, None) is not None
    setattr(base, _PATCHED, resolved)  # the forward reads it at every call: a second call only updates it
    if not already_wrapped:
        _wrap_forward(base)
    return list(layers)


def _wrap_forward(base: nn.Module) -> None:
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
        soft_exit_total_steps=None,
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
            base,
            args,
            kwargs,
            labels,
            shift_labels,
            num_items_in_batch,
            getattr(base, _PATCHED),
            soft_exit_step,
            soft_exit_total_steps,
        )

    base.forward = forward


def exit_loss_weights_of(model: nn.Module) -> dict[int, float]:
    """The base weight of each exit of a model given the SoFT loss by [`add_sorted_exit_loss`].

    Args:
        model: The model (possibly wrapped by PEFT, DDP or DeepSpeed).

    Returns:
        ``{layer: weight}``, ascending layers, weights summing to 1 (before any schedule).

    Raises:
        ValueError: when the model has no SoFT loss.
    """
    resolved = getattr(unwrap_model(model), _PATCHED, None)
    if resolved is None:
        raise ValueError(f"{type(model).__name__} has no SoFT loss: call `add_sorted_exit_loss` on it first.")
    return dict(zip(resolved.exit_layers, resolved.exit_loss_weights, strict=True))


class SortedLossWrapper(nn.Module):
    """Attach the SoFT nested-exit loss to any transformers causal LM.

    ``wrapper(input_ids=..., attention_mask=..., labels=...)`` runs the model once and returns a
    [`SortedExitOutput`] whose ``loss`` is the weighted mean over exits of each exit's token cross-entropy and whose
    ``exit_losses`` is ``{layer: mean CE}``. Exit ``k`` is ``hidden_states[k]`` through the model's own final norm and
    shared LM head (with its softcapping / logit scale); exit ``L`` (the model's last layer) is the model's ordinary
    logits. Labels are shifted as in transformers and ``-100`` is ignored; only labelled positions reach the head, in
    chunks recomputed in backward, so no ``[batch, seq, vocab]`` tensor is held. Without labels it returns the model's
    plain output.

    Usable in a plain PyTorch loop or as the ``model`` of an HF ``Trainer``. No parameters are added;
    ``save_pretrained`` writes a vanilla transformers checkpoint (no wrapper prefix) with ``soft_exit_layers`` in
    ``config.json``, which plain ``AutoModelForCausalLM.from_pretrained`` reloads.

    Args:
        model: A decoder-only transformers causal LM, or a PEFT model around one (an encoder-decoder is refused).
        settings: A [`~soft_peft.settings.SoFTSettings`]; ``None`` is the defaults (the paper's 8 evenly spaced exits
            from ~30% depth to the last layer, weights ``"last:0.75"``).
        final_norm: The final norm module, only for architectures where it cannot be found automatically.
        seed: Seed of the layer dropout draws.
        **overrides: [`~soft_peft.settings.SoFTSettings`] fields that replace those of ``settings``, such as
            ``exit_layers=[9, 18, 30]``, ``exit_loss_weights="uniform"``, ``exit_head_grad="last"``,
            ``exit_distill_weight=0.2``, ``exit_rotation=2`` or ``layer_dropout=0.1``. With a schedule
            (``exit_ramp_steps``, ``exit_rotation``, ``exit_start_steps``) or ``layer_dropout_ramp_steps``, pass
            ``step=`` (optimizer steps taken so far) to every training forward; every micro-batch of one optimizer
            step must get the same step. With ``exit_anneal_fraction > 0`` also pass ``total_steps=`` (the run's
            total optimizer steps).

    Raises:
        TypeError: for an override that is not a [`~soft_peft.settings.SoFTSettings`] field.
        ValueError: for invalid settings, or exits the model does not have.

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
        settings: SoFTSettings | None = None,
        *,
        final_norm: nn.Module | None = None,
        seed: int = 0,
        **overrides,
    ):
        super().__init__()
        _check_settings_type(settings)
        self.model = model
        self.settings = soft_settings(settings, **overrides)
        self.exit_layers = add_sorted_exit_loss(model, self.settings, final_norm=final_norm, seed=seed)

    @property
    def config(self):
        """The wrapped model's config (carries ``soft_exit_layers``)."""
        return unwrap_model(self.model).config

    def forward(self, *args, labels=None, num_items_in_batch=None, step=None, total_steps=None, **kwargs):
        """Forward with the SoFT loss when ``labels`` are given (``step``: optimizer steps taken, for a schedule;
        ``total_steps``: the run's optimizer steps, for an anneal), else the model's own forward."""
        if labels is None:
            return self.model(*args, **kwargs)
        return self.model(
            *args,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            soft_exit_loss=True,
            soft_exit_step=step,
            soft_exit_total_steps=total_steps,
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
