"""Attach the SoFT loss to a causal LM instance, and the public [`SortedLossWrapper`] module.

The exit losses are computed *inside the model's own forward* (an instance-level wrapper of ``forward``, the way TRL's
``add_fused_lm_head`` works), so DeepSpeed ZeRO-3 and FSDP see every use of the norm and head within the root module's
forward, where their parameters are gathered. Calling ``lm_head`` from outside that forward is a known FSDP failure.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .checkpoints import save_adapter_exit_layers, saves_an_adapter
from .exits import find_exit_head, parse_exit_layers, record_exit_layers, unwrap_model
from .loss import DEFAULT_VOCAB_CHUNK_SIZE, KERNELS, SortedExitLoss, exit_loss_weights, sorted_exit_loss

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
        exit_losses: ``{layer: scalar}`` mean token cross-entropy of each exit on this batch.
        exit_token_accuracy: ``{layer: scalar}`` fraction of labelled tokens each exit predicts as its argmax.
        num_tokens: Number of labelled tokens in this batch.
        last_num_correct: Labelled tokens the model's last layer predicts as its argmax (with last-layer metrics).
        last_entropy_sum: Summed entropy of the last layer over labelled tokens (with last-layer metrics).
        details: The full [`~soft_peft.loss.SortedExitLoss`] (sums, for exact cross-rank averaging).
    """

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    exit_losses: dict[int, torch.Tensor] | None = None
    exit_token_accuracy: dict[int, torch.Tensor] | None = None
    num_tokens: torch.Tensor | None = None
    last_num_correct: torch.Tensor | None = None
    last_entropy_sum: torch.Tensor | None = None
    details: SortedExitLoss | None = None


def _full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # FSDP2 may expose the head as a sharded DTensor while the backbone output is a regular tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


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
) -> SortedExitOutput:
    """Run the backbone once with hidden states, then the loss over every exit."""
    head = find_exit_head(model, final_norm=settings["final_norm"])
    exit_layers = settings["exit_layers"]
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # MoE: like the model's own forward, return the router logits when asked to or when the config says so
    with_router_logits = hasattr(text_config, "output_router_logits")
    if with_router_logits:
        with_router_logits = kwargs.get("output_router_logits")
        with_router_logits = text_config.output_router_logits if with_router_logits is None else with_router_logits
        kwargs["output_router_logits"] = bool(with_router_logits)
    kwargs["use_cache"] = False
    kwargs["output_hidden_states"] = True
    backbone = getattr(model, model.base_model_prefix)
    outputs = backbone(*args, **kwargs)
    hidden_states = outputs.hidden_states  # num_layers + 1 tensors of (B, T, H)
    if hidden_states is None or len(hidden_states) != head.num_layers + 1:
        raise ValueError(
            f"{type(model).__name__}'s backbone returned {None if hidden_states is None else len(hidden_states)} "
            f"hidden states, expected {head.num_layers + 1} (embeddings + one per layer). SoFT needs "
            "`output_hidden_states=True` to be honoured."
        )
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
    exit_hidden = []
    for layer in exit_layers:
        # The last exit is the model's own output, normed once by the backbone
        source = outputs.last_hidden_state if layer == head.num_layers else hidden_states[layer]
        selected = positions(source).to(weight.device)[mask]  # (N, H): only labelled positions reach the head
        exit_hidden.append(head.normalize(selected, layer))
    with_last = settings["with_last_layer_metrics"]
    with maybe_gather_lm_head_ctx(weight, bias):
        result = sorted_exit_loss(
            exit_hidden,
            targets,
            weight,
            bias,
            weights=settings["weights"],
            num_items_in_batch=num_items_in_batch,
            final_logit_softcapping=head.final_logit_softcapping,
            logit_scale=head.logit_scale,
            vocab_chunk_size=settings["vocab_chunk_size"],
            token_weighting=settings["token_weighting"],
            with_last_entropy=with_last and exit_layers[-1] == head.num_layers,
            kernel=settings["kernel"],
        )
        last_num_correct, last_entropy_sum = result.exit_num_correct[-1], result.last_entropy
        if with_last and exit_layers[-1] != head.num_layers:
            # The last layer is not trained here but still reported, as SFTTrainer does: a no-grad head pass
            with torch.no_grad():
                last = sorted_exit_loss(
                    [positions(outputs.last_hidden_state).to(weight.device)[mask]],
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
    loss, aux_loss = result.loss, None
    if with_router_logits:
        aux_loss = _router_aux_loss(outputs.router_logits, text_config, kwargs.get("attention_mask"), loss.device)
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss  # once, not per exit
    accuracy_denominator = result.num_tokens.clamp(min=1)
    return SortedExitOutput(
        loss=loss,
        aux_loss=aux_loss,
        exit_losses=dict(zip(exit_layers, result.exit_losses, strict=True)),
        exit_token_accuracy={
            k: c.float() / accuracy_denominator for k, c in zip(exit_layers, result.exit_num_correct, strict=True)
        },
        num_tokens=result.num_tokens,
        last_num_correct=last_num_correct if with_last else None,
        last_entropy_sum=last_entropy_sum if with_last else None,
        details=result,
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
    }
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be a positive integer, got {vocab_chunk_size}.")
    record_exit_layers(base, layers)
    if getattr(base, _PATCHED, None) is not None:
        getattr(base, _PATCHED).update(settings)
        return layers
    setattr(base, _PATCHED, settings)
    previous_forward = base.forward

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(base).forward)
    def forward(*args, soft_exit_loss=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not soft_exit_loss:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        if labels is None and shift_labels is None:
            raise ValueError("`soft_exit_loss=True` needs `labels` (use -100 for positions without a loss).")
        return _sorted_exit_forward(
            base, args, kwargs, labels, shift_labels, num_items_in_batch, getattr(base, _PATCHED)
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
        exit_loss_weights: ``"uniform"`` (paper), ``"linear"`` (deeper exits weigh more) or one weight per exit.
        final_norm: The final norm module, only for architectures where it cannot be found automatically.
        vocab_chunk_size: Vocabulary columns per head tile (memory/speed knob).

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
    ):
        super().__init__()
        self.model = model
        self.exit_layers = add_sorted_exit_loss(
            model, exit_layers, exit_loss_weights, final_norm=final_norm, vocab_chunk_size=vocab_chunk_size
        )

    @property
    def config(self):
        """The wrapped model's config (carries ``soft_exit_layers``)."""
        return unwrap_model(self.model).config

    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        """Forward with the SoFT loss when ``labels`` are given, else the model's own forward."""
        if labels is None:
            return self.model(*args, **kwargs)
        return self.model(*args, labels=labels, num_items_in_batch=num_items_in_batch, soft_exit_loss=True, **kwargs)

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
