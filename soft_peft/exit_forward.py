"""The forward that carries the SoFT loss: one backbone pass with hidden states, then every exit through the shared
final norm and head, as [`~soft_peft.wrapper.add_sorted_exit_loss`] installs it on a model instance.

[`ExitLossSettings`] is what one model's SoFT forward computes; [`SortedExitOutput`] is what it returns.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .exit_head import backbone_outputs, find_exit_head
from .layer_dropout import LayerDropout, layer_dropout_state
from .loss import (
    DEFAULT_VOCAB_CHUNK_SIZE,
    KERNELS,
    TOKEN_WEIGHTINGS,
    ExitLossTerms,
    gradient_blocked,
    sorted_exit_loss,
    validate_exit_controls,
)
from .schedule import ExitSchedule, scheduled_exit_weights

__all__ = ["ExitLossSettings", "SortedExitOutput", "sorted_exit_forward"]


@dataclass(frozen=True)
class ExitLossSettings:
    """What a model's SoFT forward computes; checked when built, so a bad value fails before any compute.

    Built by [`~soft_peft.wrapper.add_sorted_exit_loss`] from its arguments (see there for each one's meaning).

    Attributes:
        exit_layers: The resolved exits, ascending.
        weights: One base weight per exit, normalised to sum to 1.
        final_norm: The final norm given by the user, or ``None`` to find it by structure.
        vocab_chunk_size: Vocabulary columns per projection tile of the head kernel.
        token_weighting: ``"nll"``, or ``"dft"`` (TRL's DFT loss).
        with_last_layer_metrics: Also report the last layer's token accuracy and entropy.
        kernel: Head kernel, one of ``KERNELS``.
        schedule: An [`~soft_peft.schedule.ExitSchedule`], or ``None``.
        head_grad: ``"all"`` or ``"last"``: which exits update the shared final norm and head.
        distill_weight: Weight of the self-distillation term in ``[0, 1]``.
        distill_temperature: Its temperature, ``> 0``.
        layer_dropout: [`~soft_peft.layer_dropout.LayerDropout`] for training forwards, or ``None`` (off).
    """

    exit_layers: tuple[int, ...]
    weights: tuple[float, ...]
    final_norm: nn.Module | None = None
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE
    token_weighting: str = "nll"
    with_last_layer_metrics: bool = False
    kernel: str = "auto"
    schedule: ExitSchedule | None = None
    head_grad: str = "all"
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    layer_dropout: LayerDropout | None = None

    def __post_init__(self):
        if len(self.weights) != len(self.exit_layers):
            raise ValueError(f"{len(self.weights)} exit weights for {len(self.exit_layers)} exits {self.exit_layers}.")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}.")
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"token_weighting must be one of {TOKEN_WEIGHTINGS}, got {self.token_weighting!r}.")
        if not isinstance(self.vocab_chunk_size, numbers.Integral) or self.vocab_chunk_size < 1:
            raise ValueError(f"vocab_chunk_size must be a positive integer, got {self.vocab_chunk_size!r}.")
        validate_exit_controls(self.head_grad, self.distill_weight, self.distill_temperature)
        if self.schedule is not None:
            scheduled_exit_weights(list(self.weights), 0, self.schedule)  # fail now on a schedule that trains nothing
            num_early = len(self.exit_layers) - 1
            # A rotation that rotates nothing is a mistake, except with no early exit at all (plain SFT)
            if self.schedule.rotation and num_early and not self.schedule.rotates(num_early):
                warnings.warn(
                    f"exit_rotation={self.schedule.rotation} is not below the {num_early} early exits of "
                    f"{list(self.exit_layers)}, so every exit trains every step (no rotation). Use an exit_rotation "
                    f"below {num_early}, or 0 for every exit every step.",
                    stacklevel=2,
                )


@dataclass
class SortedExitOutput(ModelOutput):
    """Output of a forward with the SoFT loss.

    Attributes:
        loss: The combined (weighted mean over exits) loss, plus ``router_aux_loss_coef * aux_loss`` for MoE models
            that return their router logits (as the model's own loss includes it).
        aux_loss: The MoE router load-balancing loss (unweighted), or ``None``.
        loss_without_aux: With ``aux_loss``, the exits' loss alone (``loss`` before the auxiliary term), for trainers
            that weigh the auxiliary term themselves; else ``None``. A top-level field on purpose: ZeRO-3 hooks the
            root module's output tensors to gather the shared head again for its gradient, and a tensor found only
            inside ``details`` would escape those hooks.
        exit_losses: ``{layer: scalar}`` mean token cross-entropy of each exit on this batch (only the exits computed
            this step: a schedule skips exits whose weight is 0, see [`~soft_peft.schedule.ExitSchedule`]).
        exit_token_accuracy: ``{layer: scalar}`` fraction of labelled tokens each exit predicts as its argmax.
        num_tokens: Number of labelled tokens in this batch.
        last_num_correct: Labelled tokens the model's last layer predicts as its argmax (with last-layer metrics).
        last_entropy_sum: Summed entropy of the last layer over labelled tokens (with last-layer metrics).
        exit_agreement: With self-distillation, ``{layer: scalar}`` fraction of labelled tokens where each early exit's
            argmax is the last exit's; else ``None``.
        details: The full [`~soft_peft.loss.ExitLossTerms`] (sums, for exact cross-rank averaging), over the exits
            of ``exit_losses`` in that order.
        exit_weights: ``{layer: weight}`` the weight each exit had in ``loss`` (0 for a skipped exit).
    """

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    loss_without_aux: torch.Tensor | None = None
    exit_losses: dict[int, torch.Tensor] | None = None
    exit_token_accuracy: dict[int, torch.Tensor] | None = None
    num_tokens: torch.Tensor | None = None
    last_num_correct: torch.Tensor | None = None
    last_entropy_sum: torch.Tensor | None = None
    exit_agreement: dict[int, torch.Tensor] | None = None
    details: ExitLossTerms | None = None
    exit_weights: dict[int, float] | None = None


def _full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # FSDP2 may expose the head as a sharded DTensor while the backbone output is a regular tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shared_head_parameters(head) -> list[torch.Tensor]:
    """The final norm's and output projection's parameters, for `exit_head_grad="last"`."""
    parameters = [p for m in (head.final_norm, head.output_projection) if m is not None for p in m.parameters()]
    if any(not p.is_leaf for p in parameters):
        # FSDP1 with `use_orig_params` exposes views of a flat parameter: their `requires_grad` cannot be switched
        raise ValueError(
            "exit_head_grad='last' needs the final norm's parameters as leaf tensors (plain, DDP, ZeRO-3, FSDP2); "
            "this wrapper exposes views. Use FSDP2 (`fully_shard`) or set exit_head_grad='all'."
        )
    return parameters


def _router_aux_loss(router_logits, text_config, attention_mask, device: torch.device) -> torch.Tensor:
    """The MoE load-balancing loss, computed as the model's own forward and TRL's fused head compute it."""
    # Mixtral's is the function every MoE family of transformers copies (and the one TRL's fused head uses)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    # Padding-free batches carry no attention mask: every token counts, as in the model's own forward
    aux_loss = load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )
    if not torch.is_tensor(aux_loss):  # a plain 0 when the backbone returned no router logits
        return torch.zeros((), device=device)
    return aux_loss.to(device)


def _draw_layer_dropout(model: nn.Module, layer_dropout: LayerDropout | None, labels: torch.Tensor, step) -> None:
    """Draw this forward's layer dropout masks (training only), or clear them (evaluation: nothing is dropped)."""
    state = layer_dropout_state(model)
    if state is None:
        return
    if layer_dropout is None or not layer_dropout.enabled or not model.training:
        state.clear()
        return
    if step is None and layer_dropout.ramp_steps:
        raise ValueError(
            "This model's layer dropout ramps over optimizer steps, so a training forward needs the step: pass "
            "`soft_exit_step=step` (or `step=` to SortedLossWrapper), the number of optimizer steps taken."
        )
    rates = layer_dropout.layer_rates(state.num_layers, step or 0)
    state.draw(rates, labels.shape[0], labels.device, layer_dropout.seed, step)  # (B,) per layer: one per row


def sorted_exit_forward(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    labels: torch.Tensor,
    shift_labels: torch.Tensor | None,
    num_items_in_batch,
    settings: ExitLossSettings,
    step: int | None = None,
) -> SortedExitOutput:
    """Run the backbone once with hidden states, then the loss over every exit active at ``step``."""
    head = find_exit_head(model, final_norm=settings.final_norm)
    all_exit_layers, weights, schedule = settings.exit_layers, settings.weights, settings.schedule
    scheduled = schedule is not None and not schedule.is_constant
    if scheduled and step is None and model.training:
        raise ValueError(
            "This model has an exit schedule, so a training forward needs the optimizer step: pass "
            "`soft_exit_step=step` (or `step=` to SortedLossWrapper), the number of optimizer steps taken."
        )
    _draw_layer_dropout(model, settings.layer_dropout, labels if shift_labels is None else shift_labels, step)
    if scheduled and step is not None:
        weights = scheduled_exit_weights(weights, step, schedule)
        # A scheduled 0 never reaches the head; the deepest exit always does (it carries the last-layer metrics)
        exit_layers = [k for k, w in zip(all_exit_layers, weights, strict=True) if w > 0 or k == all_exit_layers[-1]]
    else:  # without a schedule every exit is computed, zero weights included (their metrics are still logged)
        exit_layers = list(all_exit_layers)
    exit_weights = dict(zip(all_exit_layers, weights, strict=True))
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # MoE: like the model's own forward, return the router logits when asked to or when the config says so
    with_router_logits = hasattr(text_config, "output_router_logits")
    if with_router_logits:
        with_router_logits = kwargs.get("output_router_logits")
        with_router_logits = text_config.output_router_logits if with_router_logits is None else with_router_logits
        kwargs["output_router_logits"] = bool(with_router_logits)
    outputs = backbone_outputs(model, *args, **kwargs)  # num_layers + 1 hidden states of (B, T, H)
    if shift_labels is None:
        targets_2d = labels[:, 1:]  # (B, T-1): position i predicts token i+1

        def positions(h):
            return h[:, :-1]
    else:  # context/sequence parallelism pass labels already shifted
        targets_2d = shift_labels

        def positions(h):
            return h

    weight = _full_tensor(head.lm_head.weight)
    bias = _full_tensor(getattr(head.lm_head, "bias", None))
    targets_2d = targets_2d.to(weight.device)
    mask = targets_2d != -100  # (B, T-1)
    targets = targets_2d[mask]  # (N,)

    def labelled(state):  # (B, T, H) -> (N, H): only labelled positions reach the norm and head
        return positions(state).to(weight.device)[mask]

    exit_hidden = []
    # With exit_head_grad="last" the early exits go through the norm (and projection) without updating them
    shared = _shared_head_parameters(head) if settings.head_grad == "last" else []
    for layer in exit_layers:
        with gradient_blocked(*shared) if layer != exit_layers[-1] else contextlib.nullcontext():
            exit_hidden.append(head.exit_state(outputs, layer, labelled))
    with_last = settings.with_last_layer_metrics
    with maybe_gather_lm_head_ctx(weight, bias):
        result = sorted_exit_loss(
            exit_hidden,
            targets,
            weight,
            bias,
            weights=[exit_weights[k] for k in exit_layers],
            num_items_in_batch=num_items_in_batch,
            final_logit_softcapping=head.final_logit_softcapping,
            logit_scale=head.logit_scale,
            vocab_chunk_size=settings.vocab_chunk_size,
            token_weighting=settings.token_weighting,
            with_last_entropy=with_last and exit_layers[-1] == head.num_layers,
            kernel=settings.kernel,
            head_grad=settings.head_grad,
            distill_weight=settings.distill_weight,
            distill_temperature=settings.distill_temperature,
        )
        last_num_correct, last_entropy_sum = result.exit_num_correct[-1], result.last_entropy
        if with_last and exit_layers[-1] != head.num_layers:
            # The last layer is not trained here but still reported, as SFTTrainer does: a no-grad head pass
            with torch.no_grad():
                last = sorted_exit_loss(
                    [head.exit_state(outputs, head.num_layers, labelled)],
                    targets,
                    weight,
                    bias,
                    final_logit_softcapping=head.final_logit_softcapping,
                    logit_scale=head.logit_scale,
                    vocab_chunk_size=settings.vocab_chunk_size,
                    with_last_entropy=True,
                    kernel=settings.kernel,
                )
            last_num_correct, last_entropy_sum = last.exit_num_correct[0], last.last_entropy
    loss, aux_loss, loss_without_aux = result.loss, None, None
    if with_router_logits:
        aux_loss = _router_aux_loss(outputs.router_logits, text_config, kwargs.get("attention_mask"), loss.device)
        loss_without_aux = loss
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss  # once, not per exit
    accuracy_denominator = result.num_tokens.clamp(min=1)
    return SortedExitOutput(
        loss=loss,
        aux_loss=aux_loss,
        loss_without_aux=loss_without_aux,
        exit_losses=dict(zip(exit_layers, result.exit_losses, strict=True)),
        exit_token_accuracy={
            k: c.float() / accuracy_denominator for k, c in zip(exit_layers, result.exit_num_correct, strict=True)
        },
        num_tokens=result.num_tokens,
        last_num_correct=last_num_correct if with_last else None,
        last_entropy_sum=last_entropy_sum if with_last else None,
        exit_agreement=None
        if result.exit_num_agree is None
        else {
            k: c.float() / accuracy_denominator for k, c in zip(exit_layers[:-1], result.exit_num_agree, strict=True)
        },
        details=result,
        exit_weights=exit_weights,
    )
