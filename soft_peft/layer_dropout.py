"""LayerSkip's layer dropout (arXiv 2404.16710, §4.1): per-sample stochastic depth whose rate grows with depth.

In a training forward, each sample of the batch skips decoder layer ``l`` (the layer is the identity for that sample)
with probability ``p_l(t) = rate * S(l) * R(t)``:

* ``S(l)``, the scale over depth, for layer index ``l = 0 .. L-1``: ``"exp"`` (LayerSkip's default,
  ``2 ** (l / (L - 1)) - 1``), ``"linear"`` (``l / (L - 1)``) or ``"constant"`` (1). The first two never drop the first
  layer and drop the last layer with probability ``rate``.
* ``R(t)``, an optional curriculum over optimizer steps ``t``: with ``ramp_steps > 0`` the rate rises as LayerSkip's
  exponential time scale, ``R(t) = 2 ** (min(t, ramp_steps) / ramp_steps) - 1``, from 0 to 1; else ``R = 1``. Like
  [`~soft_peft.schedule.ExitSchedule`] it is a pure function of ``state.global_step``, so a resumed run continues
  exactly where it stopped.

The draws are a pure function of ``(seed, step, micro-batch, global sample index)``: each rank draws the masks of the
whole global batch from a generator seeded by the first three and keeps its own rows. So 2 processes x 1 row drop the
same layers for the same rows as 1 process x 2 rows, a resumed run draws what the uninterrupted run drew, and the
global RNG (data order, dropout) is left untouched.

Every layer still runs on the whole batch and a dropped sample takes the layer's input back with ``torch.where``: the
output for that sample is bit for bit its input, and no gradient reaches the layer from it. Running every layer keeps
every parameter in every step's graph, so DDP, ZeRO-3 and FSDP synchronise gradients as usual even when every sample
of a batch skips a layer (on one rank or all). The price: layer dropout here regularises the sub-models, it does not
make the step faster.

Dropout is applied only inside a SoFT training forward (``model.training`` and a step): evaluation, ``generate`` and
soft-peft's decoders never drop a layer. It adds no parameter and no buffer, so checkpoints stay vanilla models.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .model_layout import get_decoder_layers, unwrap_model

__all__ = [
    "LAYER_DROPOUT_SCALES",
    "LayerDropout",
    "draw_layer_dropout",
    "install_layer_dropout",
    "layer_dropout_state",
    "realised_drop_rates",
]

LAYER_DROPOUT_SCALES = ("exp", "linear", "constant")

# Set on the model instance: the controller its wrapped layers read (also marks the layers as wrapped)
_CONTROLLER = "_soft_peft_layer_dropout"


@dataclass(frozen=True)
class LayerDropout:
    """How much layer dropout, where in depth and when in training (see the module docstring).

    Attributes:
        rate: The largest drop probability ``p_max`` in ``[0, 1)``; 0 (default) is off.
        scale: Shape over depth: ``"exp"`` (LayerSkip's), ``"linear"`` or ``"constant"``.
        ramp_steps: Optimizer steps over which the rate rises to ``rate`` (LayerSkip's exponential time curriculum);
            0 (default) is the full rate from the first step.
        seed: Seed of the draws (``SoFTTrainer`` passes the run's ``seed``).
    """

    rate: float = 0.0
    scale: str = "exp"
    ramp_steps: int = 0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate < 1.0):
            raise ValueError(
                f"layer_dropout must be a probability in [0, 1) (0 = off; LayerSkip used 0.1-0.2), got {self.rate!r}."
            )
        if self.scale not in LAYER_DROPOUT_SCALES:
            raise ValueError(f"layer_dropout_scale must be one of {LAYER_DROPOUT_SCALES}, got {self.scale!r}.")
        if not isinstance(self.ramp_steps, int) or self.ramp_steps < 0:
            raise ValueError(
                f"layer_dropout_ramp_steps must be an integer >= 0 (0 = no ramp), got {self.ramp_steps!r}."
            )

    @property
    def enabled(self) -> bool:
        """True when some layer can be dropped at some step."""
        return self.rate > 0

    def layer_rates(self, num_layers: int, step: int) -> list[float]:
        """The drop probability of each of ``num_layers`` decoder layers at optimizer step ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"The layer dropout step must be >= 0 (optimizer steps taken), got {step}.")
        if self.ramp_steps:
            time_scale = 2.0 ** (min(step, self.ramp_steps) / self.ramp_steps) - 1.0
        else:
            time_scale = 1.0
        depth = [self._depth_scale(index, num_layers) for index in range(num_layers)]
        return [self.rate * d * time_scale for d in depth]

    def _depth_scale(self, index: int, num_layers: int) -> float:
        if self.scale == "constant" or num_layers == 1:
            return 1.0
        position = index / (num_layers - 1)  # 0 for the first layer, 1 for the last
        return 2.0**position - 1.0 if self.scale == "exp" else position


class _LayerDropoutState:
    """The per-model state the wrapped layers read: the keep masks of the training forward in progress, and counts."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        # One (B,) bool mask per layer, or None for a layer that drops nothing. Drawn once per training forward and
        # kept until the next forward, so that activation checkpointing's re-run in backward sees the same masks
        self.keep_masks: list[torch.Tensor | None] | None = None
        self.dropped = [0] * num_layers  # samples that skipped each layer (ints, or device tensors until read)
        self.seen = [0] * num_layers  # samples drawn for each layer while its rate was above 0
        self._step, self._micro = None, -1  # micro-batches of one optimizer step get different draws

    def draw(self, rates: list[float], batch_size: int, device: torch.device, seed: int, step: int | None) -> None:
        """Draw this forward's keep masks: sample ``b`` keeps layer ``l`` with probability ``1 - rates[l]``.

        Args:
            rates: One drop probability per decoder layer.
            batch_size: This rank's rows.
            device: Where the masks go (the batch's device).
            seed: Seed of the run.
            step: Optimizer steps taken, or ``None`` outside a trainer (then every forward is its own draw).
        """
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        rank, world = _rank_and_world()
        # A CPU generator: the same numbers on every device type, and the global RNG is not consumed
        generator = torch.Generator().manual_seed(
            hash((seed, -1 if step is None else step, self._micro)) & (2**63 - 1)
        )
        uniform = torch.rand(world * batch_size, len(rates), generator=generator)  # (global B, L)
        uniform = uniform[rank * batch_size : (rank + 1) * batch_size].to(device)  # (B, L): this rank's rows
        masks = []
        for index, rate in enumerate(rates):
            if rate <= 0.0:
                masks.append(None)
                continue
            keep = uniform[:, index] >= rate  # (B,)
            # Counted on the device: no host sync per layer
            self.dropped[index] = self.dropped[index] + (batch_size - keep.sum())
            self.seen[index] += batch_size
            masks.append(keep)
        self.keep_masks = masks

    def clear(self) -> None:
        """Forget the masks: the next forward (evaluation, generation, a plain call) drops nothing."""
        self.keep_masks = None


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _drop(layer: nn.Module, index: int, state: _LayerDropoutState, forward, *args, **kwargs):
    output = forward(*args, **kwargs)
    keep = state.keep_masks[index] if state.keep_masks is not None and layer.training else None
    if keep is None:
        return output
    inputs = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
    hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
    if keep.shape[0] != inputs.shape[0]:
        raise RuntimeError(
            f"Layer dropout drew masks for {keep.shape[0]} samples but layer {index} got {inputs.shape[0]}: the masks "
            "belong to another forward. Call the model through its SoFT forward (soft_exit_loss=True)."
        )
    mixed = torch.where(keep.view(-1, *([1] * (hidden.dim() - 1))), hidden, inputs.to(hidden.dtype))
    return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


def install_layer_dropout(model: nn.Module) -> _LayerDropoutState:
    """Wrap each decoder layer's ``forward`` of this model instance (once) so that it can be dropped per sample.

    The wrapped layers do nothing until masks are drawn by [`draw_layer_dropout`], which
    [`~soft_peft.exit_forward.sorted_exit_forward`] does before a training forward.

    Args:
        model: A transformers causal LM, possibly wrapped (PEFT, DDP, DeepSpeed).

    Returns:
        The model's layer dropout state (the same object on a second call).
    """
    base = unwrap_model(model)
    state = getattr(base, _CONTROLLER, None)
    if state is not None:
        return state
    layers = get_decoder_layers(base)
    state = _LayerDropoutState(len(layers))
    for index, layer in enumerate(layers):
        # An instance attribute: `nn.Module.__call__` (and activation checkpointing's re-run of it) calls it, and
        # transformers' output recorders hook the module, so `hidden_states[index + 1]` is the mixed output
        layer.forward = functools.partial(_drop, layer, index, state, layer.forward)
    setattr(base, _CONTROLLER, state)
    return state


def layer_dropout_state(model: nn.Module) -> _LayerDropoutState | None:
    """The layer dropout state installed on this model by [`install_layer_dropout`], or ``None``."""
    return getattr(unwrap_model(model), _CONTROLLER, None)


def draw_layer_dropout(model: nn.Module, layer_dropout: LayerDropout, labels: torch.Tensor, step: int | None) -> None:
    """Draw the layer dropout masks of a SoFT forward (training only), or clear them (evaluation drops nothing).

    Args:
        model: The model, with layer dropout installed by [`install_layer_dropout`] (else nothing happens).
        layer_dropout: Its [`LayerDropout`] settings.
        labels: ``(B, T)`` labels of the batch (one mask row per sample).
        step: Optimizer steps taken; needed in training when the rate ramps over steps.

    Raises:
        ValueError: for a training forward without a step when the rate ramps.
    """
    state = layer_dropout_state(model)
    if state is None:
        return
    if not layer_dropout.enabled or not model.training:
        state.clear()
        return
    if step is None and layer_dropout.ramp_steps:
        raise ValueError(
            "This model's layer dropout ramps over optimizer steps, so a training forward needs the step: pass "
            "`soft_exit_step=step` (or `step=` to SortedLossWrapper), the number of optimizer steps taken."
        )
    rates = layer_dropout.layer_rates(state.num_layers, step or 0)
    state.draw(rates, labels.shape[0], labels.device, layer_dropout.seed, step)  # (B,) per layer: one per row


def realised_drop_rates(model: nn.Module) -> list[float]:
    """Fraction of samples that skipped each decoder layer over the training forwards so far (``nan`` for a layer no
    sample reached with dropout on)."""
    state = layer_dropout_state(model)
    if state is None:
        raise ValueError("This model has no layer dropout installed (layer_dropout=0).")
    return [float(d) / s if s else math.nan for d, s in zip(state.dropped, state.seen, strict=True)]
