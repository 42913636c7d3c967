"""Attach the SoFT loss to a causal LM instance, and the public [`SortedLossWrapper`] module.

The exit losses are computed *inside the model's own forward* (an instance-level wrapper of ``forward``, the way TRL's
``add_fused_lm_head`` works), so DeepSpeed ZeRO-3 and FSDP see every use of the norm and head within the root module's
forward, where their parameters are gathered. Calling ``lm_head`` from outside that forward is a known FSDP failure.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .checkpoints import save_adapter_exit_layers, saves_an_adapter
from .exit_head import backbone_outputs, find_exit_head, unwrap_model
from .exits import parse_exit_layers, record_exit_layers
from .loss import (
    DEFAULT_VOCAB_CHUNK_SIZE,
    KERNELS,
    ExitLossTerms,
    exit_loss_weights,
    gradient_blocked,
    sorted_exit_loss,
    validate_exit_controls,
)
from .schedule import ExitSchedule, scheduled_exit_weights

__all__ = ["SortedExitOutput", "SortedLossWrapper", "add_sorted_exit_loss"]

# Marks a model whose forward already carries the SoFT loss, so it is never wrapped twice
_PATCHED = "_soft_peft_exit_loss"


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


def _sorted_exit_forward(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    labels: torch.Tensor,
    shift_labels: torch.Tensor | None,
    num_items_in_batch,
    settings: dict,
    step: int | None = None,
) -> SortedExitOutput:
    """Run the backbone once with hidden states, then the loss over every exit active at ``step``."""
    head = find_exit_head(model, final_norm=settings["final_norm"])
    all_exit_layers, weights, schedule = settings["exit_layers"], settings["weights"], settings["schedule"]
    scheduled = schedule is not None and not schedule.is_constant
    if scheduled and step is None and model.training:
        raise ValueError(
            "This model has an exit schedule, so a training forward needs the optimizer step: pass "
            "`soft_exit_step=step` (or `step=` to SortedLossWrapper), the number of optimizer steps taken."
        )
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
    shared = _shared_head_parameters(head) if settings["head_grad"] == "last" else []
    for layer in exit_layers:
        with gradient_blocked(*shared) if layer != exit_layers[-1] else contextlib.nullcontext():
            exit_hidden.append(head.exit_state(outputs, layer, labelled))
    with_last = settings["with_last_layer_metrics"]
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
            vocab_chunk_size=settings["vocab_chunk_size"],
            token_weighting=settings["token_weighting"],
            with_last_entropy=with_last and exit_layers[-1] == head.num_layers,
            kernel=settings["kernel"],
            head_grad=settings["head_grad"],
            distill_weight=settings["distill_weight"],
            distill_temperature=settings["distill_temperature"],
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
                    vocab_chunk_size=settings["vocab_chunk_size"],
                    with_last_entropy=True,
                    kernel=settings["kernel"],
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


def add_sorted_exit_loss(
    model: nn.Module,
    exit_layers: str | Sequence[int] | None = None,
    exit_loss_weights_spec: str | Sequence[float] = "uniform",
    final_norm: nn.Module | None = None,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    token_weighting: str = "nll",
    with_last_layer_metrics: bool = False,
    kernel: str = "auto",
    schedule: ExitSchedule | None = None,
    exit_head_grad: str = "all",
    exit_distill_weight: float = 0.0,
    exit_distill_temperature: float = 1.0,
) -> list[int]:
    """Give a causal LM instance the SoFT loss: ``model(..., labels=y, soft_exit_loss=True)`` returns a
    [`SortedExitOutput`].

    Only this instance's ``forward`` is wrapped; without ``soft_exit_loss=True`` it calls the previous forward, so
    generation, TRL's fused head and PEFT are unchanged. The exits are recorded as ``soft_exit_layers`` in the config.
    Calling it again updates the settings rather than wrapping twice.

    Args:
        model: A transformers causal LM or a PEFT model around one.
        exit_layers: See [`~soft_peft.exits.parse_exit_layers`]; ``None`` is the paper's 8 evenly spaced exits.
        exit_loss_weights_spec: See [`~soft_peft.loss.exit_loss_weights`].
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

    Returns:
        The resolved exit layers, ascending.
    """
    base = unwrap_model(model)
    head = find_exit_head(base, final_norm=final_norm)  # fail now, not at the first step
    layers = parse_exit_layers(exit_layers, head.num_layers)
    settings = {
        "exit_layers": layers,
        "weights": exit_loss_weights(exit_loss_weights_spec, layers),
        "final_norm": final_norm,
        "vocab_chunk_size": int(vocab_chunk_size),
        "token_weighting": token_weighting,
        "with_last_layer_metrics": with_last_layer_metrics,
        "kernel": kernel,
        "schedule": schedule,
        "head_grad": exit_head_grad,
        "distill_weight": float(exit_distill_weight),
        "distill_temperature": float(exit_distill_temperature),
    }
    validate_exit_controls(exit_head_grad, exit_distill_weight, exit_distill_temperature)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be a positive integer, got {vocab_chunk_size}.")
    if schedule is not None:
        scheduled_exit_weights(settings["weights"], 0, schedule)  # fail now on a schedule that trains nothing
    record_exit_layers(base, layers)
    if getattr(base, _PATCHED, None) is not None:
        getattr(base, _PATCHED).update(settings)
        return layers
    setattr(base, _PATCHED, settings)
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
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        if labels is None and shift_labels is None:
            raise ValueError("`soft_exit_loss=True` needs `labels` (use -100 for positions without a loss).")
        return _sorted_exit_forward(
            base, args, kwargs, labels, shift_labels, num_items_in_batch, getattr(base, _PATCHED), soft_exit_step
        )

    base.forward = forward
    return layers


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
        model: A transformers causal LM, or a PEFT model around one.
        exit_layers: List of layers, ``"12,16,20"`` or ``"start:stop:step"``; ``None`` is the paper's 8 evenly spaced
            exits from ~30% depth to the last layer (see [`~soft_peft.exits.default_exit_layers`]).
        exit_loss_weights: ``"uniform"`` (paper), ``"linear"`` (deeper exits weigh more), ``"last:w"`` (the last exit
            keeps weight ``w``, the others share ``1 - w``) or one weight per exit; normalised to sum to 1 (see
            [`~soft_peft.loss.exit_loss_weights`]).
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
        exit_loss_weights: str | Sequence[float] = "uniform",
        final_norm: nn.Module | None = None,
        vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
        schedule: ExitSchedule | None = None,
        exit_head_grad: str = "all",
        exit_distill_weight: float = 0.0,
        exit_distill_temperature: float = 1.0,
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
            save_adapter_exit_layers(save_directory, self.exit_layers)
        return result

    def state_dict(self, *args, **kwargs):
        """The wrapped model's state dict, without a wrapper prefix."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Load a (vanilla) state dict into the wrapped model."""
        return self.model.load_state_dict(state_dict, *args, **kwargs)
