"""The forward that carries the SoFT loss: one backbone pass with hidden states, then every exit through the shared
final norm and head, as [`~soft_peft.wrapper.add_sorted_exit_loss`] installs it on a model instance.

[`ResolvedExitLoss`] is what one model's SoFT forward computes (its settings resolved against the model's depth);
[`SortedExitOutput`] is what it returns, with the per-batch sums behind the logged metrics in [`ExitStats`]. The
forward runs in named steps: the exits and weights of this step, MoE arguments, labelled positions, exit states
(with the head gradient blocked for early exits when asked), the loss, the model's last-layer metrics, the router
loss, and the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .exit_head import ExitHead, find_exit_head
from .layer_dropout import LayerDropout, draw_layer_dropout
from .loss import ExitLossTerms, HeadParameters, gradient_blocked, sorted_exit_loss
from .model_layout import backbone_outputs
from .schedule import ExitSchedule, scheduled_exit_weights

if TYPE_CHECKING:
    from .settings import SoFTSettings

# One import path, the top level: `from soft_peft import SortedExitOutput`
__all__ = ["ExitStats", "LabelledPositions", "ResolvedExitLoss", "sorted_exit_forward"]


@dataclass(frozen=True)
class ResolvedExitLoss:
    """One model's SoFT loss: its settings and what they resolve to for that model. Checked when built.

    Built by [`~soft_peft.wrapper.add_sorted_exit_loss`] and kept on the model instance; its forward reads it at
    every call.

    Attributes:
        settings: The [`~soft_peft.settings.SoFTSettings`], already validated.
        exit_layers: The exits of ``settings.exit_layers`` on this model, ascending (zero-weight ones included).
        exit_loss_weights: One base weight per exit of ``exit_layers``, summing to 1 (before any schedule).
        final_norm: The final norm given by the user, or ``None`` to find it by structure.
        last_layer_metrics: Also report the model's last layer's token accuracy and entropy (``SFTTrainer``'s
            ``mean_token_accuracy`` and ``entropy``), with a no-grad head pass when the last layer is not an exit.
        seed: Seed of the layer dropout draws.
    """

    settings: SoFTSettings
    exit_layers: tuple[int, ...]
    exit_loss_weights: tuple[float, ...]
    final_norm: nn.Module | None = None
    last_layer_metrics: bool = False
    seed: int = 0

    def __post_init__(self):
        if len(self.exit_loss_weights) != len(self.exit_layers):
            raise ValueError(
                f"{len(self.exit_loss_weights)} exit weights for {len(self.exit_layers)} exits {self.exit_layers}."
            )
        # Fail now on a schedule that trains nothing at its first step (an anneal never can: the deepest exit takes
        # what the early exits lose, so any run length checks it)
        scheduled_exit_weights(list(self.exit_loss_weights), 0, self.schedule, total_steps=1)
        num_early = len(self.exit_layers) - 1
        rotation = self.schedule.rotation
        # A rotation that rotates nothing is a mistake, except with no early exit at all (plain SFT)
        if rotation and num_early and not self.schedule.rotates(num_early):
            warnings.warn(
                f"exit_rotation={rotation} is not below the {num_early} early exits of {list(self.exit_layers)}, so "
                f"every exit trains every step (no rotation). Use an exit_rotation below {num_early}, or 0 for every "
                "exit every step.",
                stacklevel=3,
            )

    @property
    def schedule(self) -> ExitSchedule:
        """The exit schedule of the settings."""
        return self.settings.exit_schedule()

    @property
    def layer_dropout(self) -> LayerDropout:
        """The layer dropout of the settings, drawing with ``seed``."""
        return self.settings.layer_dropout_settings(self.seed)


# The sums of `ExitStats`, in the order they travel in one collective
_SUMMED_STATS = (
    "exit_nll_sums",
    "exit_num_correct",
    "num_tokens",
    "last_layer_num_correct",
    "last_layer_entropy_sum",
    "exit_kl_sums",
    "exit_num_agree",
)


@dataclass
class ExitStats:
    """The per-batch sums behind the logged metrics: added across ranks first, then divided, so averages are exact.

    Attributes:
        computed_exits: The exits computed this step, ascending (the deepest last); the per-exit lists follow them.
        exit_nll_sums: One summed token NLL per computed exit.
        exit_num_correct: Labelled tokens each computed exit predicts as its argmax.
        num_tokens: Labelled tokens in the batch.
        last_layer_num_correct: Labelled tokens the model's last layer predicts as its argmax (with last-layer
            metrics), else ``None``.
        last_layer_entropy_sum: The model's last layer's summed entropy over labelled tokens (with last-layer
            metrics), else ``None``.
        exit_kl_sums: With self-distillation, one summed ``T^2 * KL(p_deepest || p_exit)`` per early exit; else empty.
        exit_num_agree: With self-distillation, labelled tokens where each early exit's argmax is the deepest exit's;
            else empty.
    """

    computed_exits: list[int]
    exit_nll_sums: list
    exit_num_correct: list
    num_tokens: torch.Tensor | float
    last_layer_num_correct: torch.Tensor | float | None = None
    last_layer_entropy_sum: torch.Tensor | float | None = None
    exit_kl_sums: list = dataclasses.field(default_factory=list)
    exit_num_agree: list = dataclasses.field(default_factory=list)

    def summed(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> ExitStats:
        """These sums added over every rank, as Python floats, in one collective.

        Args:
            gather: Gathers a ``(S,)`` tensor from every rank into ``(ranks * S,)`` (``accelerator.gather``); the
                identity on one process. Every rank must hold the same fields (the same exits computed).

        Returns:
            A new [`ExitStats`] whose sums are floats over all ranks.
        """
        parts = {name: getattr(self, name) for name in _SUMMED_STATS if getattr(self, name) is not None}
        flat = [t.float() for value in parts.values() for t in (value if isinstance(value, list) else [value])]
        local = torch.stack(flat).detach()  # (S,)
        totals = gather(local).view(-1, local.numel()).sum(0).tolist()
        summed, start = {}, 0
        for name, value in parts.items():
            size = len(value) if isinstance(value, list) else 1
            summed[name] = totals[start : start + size] if isinstance(value, list) else totals[start]
            start += size
        return dataclasses.replace(self, **summed)


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
            inside a nested object would escape those hooks.
        exit_losses: ``{layer: scalar}`` mean token cross-entropy of each exit on this batch (only the exits computed
            this step: a schedule skips exits whose weight is 0, see [`~soft_peft.schedule.ExitSchedule`]).
        exit_token_accuracy: ``{layer: scalar}`` fraction of labelled tokens each exit predicts as its argmax.
        exit_agreement: With self-distillation, ``{layer: scalar}`` fraction of labelled tokens where each early exit's
            argmax is the deepest exit's; else ``None``.
        exit_weights: ``{layer: weight}`` the weight each exit had in ``loss`` (0 for a skipped exit).
        num_tokens: Number of labelled tokens in this batch.
        stats: The [`ExitStats`] (detached sums, for exact cross-rank averaging), over the exits of ``exit_losses``.
    """

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    loss_without_aux: torch.Tensor | None = None
    exit_losses: dict[int, torch.Tensor] | None = None
    exit_token_accuracy: dict[int, torch.Tensor] | None = None
    exit_agreement: dict[int, torch.Tensor] | None = None
    exit_weights: dict[int, float] | None = None
    num_tokens: torch.Tensor | None = None
    stats: ExitStats | None = None


@dataclass
class LabelledPositions:
    """The positions of a batch that carry a label, and how to pick their hidden states.

    Attributes:
        targets: ``(N,)`` the next-token labels of the ``N`` labelled positions.
        mask: ``(B, T')`` which positions carry a label (``T' = T - 1`` for unshifted labels).
        shift: Whether the labels were unshifted (position ``i`` predicts token ``i + 1``, as in transformers),
            so that the last position of each hidden state has no target; ``False`` for labels passed shifted
            (context/sequence parallelism).
        device: Where the head is, and so where the selected states go.
    """

    targets: torch.Tensor
    mask: torch.Tensor
    shift: bool
    device: torch.device

    @classmethod
    def of(cls, labels: torch.Tensor, shift_labels: torch.Tensor | None, device: torch.device) -> LabelledPositions:
        """From transformers' ``labels`` ``(B, T)``, or already shifted ``shift_labels`` ``(B, T)``."""
        shift = shift_labels is None
        targets_2d = (labels[:, 1:] if shift else shift_labels).to(device)  # (B, T')
        mask = targets_2d != -100
        return cls(targets=targets_2d[mask], mask=mask, shift=shift, device=device)

    def select(self, state: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` -> ``(N, H)``: only labelled positions reach the norm and head."""
        return (state[:, :-1] if self.shift else state).to(self.device)[self.mask]


def _full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # FSDP2 may expose the head as a sharded DTensor while the backbone output is a regular tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shared_head_parameters(head) -> list[torch.Tensor]:
    """The final norm's and output projection's parameters, for `exit_head_grad="last"` (deepest exit only)."""
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


def _exits_at_step(
    loss: ResolvedExitLoss, step: int | None, total_steps: int | None, training: bool
) -> tuple[dict[int, float], list[int]]:
    """Every exit's weight at ``step`` of a run of ``total_steps`` and the exits to compute (ascending): a scheduled
    0 never reaches the head."""
    all_exits, schedule = loss.exit_layers, loss.schedule
    if schedule.is_constant:  # every exit is computed, zero weights included (their metrics are still logged)
        return dict(zip(all_exits, loss.exit_loss_weights, strict=True)), list(all_exits)
    if step is None:
        if training:
            raise ValueError(
                "This model has an exit schedule, so a training forward needs the optimizer step: pass "
                "`soft_exit_step=step` (or `step=` to SortedLossWrapper), the number of optimizer steps taken."
            )
        return dict(zip(all_exits, loss.exit_loss_weights, strict=True)), list(all_exits)  # evaluation: base weights
    if schedule.anneals and total_steps is None:
        raise ValueError(
            f"This model's exit schedule anneals (exit_anneal_fraction={schedule.anneal_fraction}) over the end of "
            "the run, so a training forward needs the run's length: pass `soft_exit_total_steps=T` (or "
            "`total_steps=` to SortedLossWrapper), the total number of optimizer steps of the run."
        )
    weights = scheduled_exit_weights(loss.exit_loss_weights, step, schedule, total_steps)
    # The deepest exit is always computed: it carries the last-layer metrics
    computed = [k for k, w in zip(all_exits, weights, strict=True) if w > 0 or k == all_exits[-1]]
    return dict(zip(all_exits, weights, strict=True)), computed


def _request_router_logits(text_config, kwargs: dict) -> bool:
    """MoE: like the model's own forward, return the router logits when asked to or when the config says so."""
    if not hasattr(text_config, "output_router_logits"):
        return False
    requested = kwargs.get("output_router_logits")
    requested = bool(text_config.output_router_logits if requested is None else requested)
    kwargs["output_router_logits"] = requested
    return requested


def _head_parameters(head: ExitHead) -> HeadParameters:
    return HeadParameters(
        weight=_full_tensor(head.lm_head.weight),
        bias=_full_tensor(getattr(head.lm_head, "bias", None)),
        final_logit_softcapping=head.final_logit_softcapping,
        logit_scale=head.logit_scale,
    )


def _exit_states(head: ExitHead, outputs, exits: list[int], positions: LabelledPositions, head_grad: str) -> list:
    """The normed ``(N, H)`` state of each exit; with ``head_grad="last"`` the early exits go through the norm (and
    projection) without updating them."""
    shared = _shared_head_parameters(head) if head_grad == "last" else []
    states = []
    for layer in exits:
        with gradient_blocked(*shared) if layer != exits[-1] else contextlib.nullcontext():
            states.append(head.exit_state(outputs, layer, positions.select))
    return states


def _last_layer_metrics(head, outputs, positions, parameters, settings, terms, computed) -> tuple:
    """The model's last layer's correct-token count and summed entropy (``SFTTrainer``'s metrics): from the loss
    when the last layer is the deepest exit computed, else from a no-grad head pass (it is not trained here)."""
    if computed[-1] == head.num_layers:
        return terms.exit_num_correct[-1], terms.deepest_entropy_sum
    with torch.no_grad():
        last_layer_terms = sorted_exit_loss(
            [head.exit_state(outputs, head.num_layers, positions.select)],
            positions.targets,
            parameters,
            options=settings,  # one exit: only the kernel settings matter for these counts
            with_deepest_entropy=True,
        )
    return last_layer_terms.exit_num_correct[0], last_layer_terms.deepest_entropy_sum


def _exit_stats(terms: ExitLossTerms, computed: list[int], last_layer: tuple | None) -> ExitStats:
    num_correct, entropy_sum = last_layer if last_layer is not None else (None, None)
    return ExitStats(
        computed_exits=list(computed),
        exit_nll_sums=terms.exit_nll_sums,
        exit_num_correct=terms.exit_num_correct,
        num_tokens=terms.num_tokens,
        last_layer_num_correct=num_correct,
        last_layer_entropy_sum=entropy_sum,
        exit_kl_sums=terms.exit_kl_sums or [],
        exit_num_agree=terms.exit_num_agree or [],
    )


def _output(terms: ExitLossTerms, stats: ExitStats, exit_weights: dict, loss, aux_loss) -> SortedExitOutput:
    computed = stats.computed_exits
    denominator = terms.num_tokens.clamp(min=1)

    def fractions(exits, counts):
        return {k: c.float() / denominator for k, c in zip(exits, counts, strict=True)}

    agreement = None if terms.exit_num_agree is None else fractions(computed[:-1], terms.exit_num_agree)
    return SortedExitOutput(
        loss=loss,
        aux_loss=aux_loss,
        loss_without_aux=None if aux_loss is None else terms.loss,
        exit_losses=dict(zip(computed, terms.exit_losses, strict=True)),
        exit_token_accuracy={
            k: c.float() / denominator for k, c in zip(computed, terms.exit_num_correct, strict=True)
        },
        exit_agreement=agreement,
        exit_weights=exit_weights,
        num_tokens=terms.num_tokens,
        stats=stats,
    )


def sorted_exit_forward(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    labels: torch.Tensor,
    shift_labels: torch.Tensor | None,
    num_items_in_batch,
    loss: ResolvedExitLoss,
    step: int | None = None,
    total_steps: int | None = None,
) -> SortedExitOutput:
    """Run the backbone once with hidden states, then the loss over every exit active at ``step``.

    Args:
        model: The unwrapped causal LM whose forward carries the SoFT loss.
        args: Positional arguments of the model's forward (``input_ids``, ...).
        kwargs: Keyword arguments of the model's forward, without the labels.
        labels: ``(B, T)`` labels as transformers takes them (``-100`` for positions without a loss).
        shift_labels: ``(B, T)`` labels already shifted (context/sequence parallelism), or ``None``.
        num_items_in_batch: The token count the Trainer passes under gradient accumulation, or ``None``.
        loss: The model's [`ResolvedExitLoss`].
        step: Optimizer steps taken (for a schedule or a layer dropout ramp); ``None`` outside training.
        total_steps: Optimizer steps of the whole run (for an anneal); ``None`` outside training.

    Returns:
        A [`SortedExitOutput`].
    """
    settings = loss.settings
    head = find_exit_head(model, final_norm=loss.final_norm)
    exit_weights, computed = _exits_at_step(loss, step, total_steps, model.training)
    draw_layer_dropout(model, loss.layer_dropout, labels if shift_labels is None else shift_labels, step)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    with_router_logits = _request_router_logits(text_config, kwargs)
    outputs = backbone_outputs(model, *args, **kwargs)  # num_layers + 1 hidden states of (B, T, H)
    parameters = _head_parameters(head)
    positions = LabelledPositions.of(labels, shift_labels, parameters.weight.device)
    exit_hidden = _exit_states(head, outputs, computed, positions, settings.exit_head_grad)
    with maybe_gather_lm_head_ctx(parameters.weight, parameters.bias):
        terms = sorted_exit_loss(
            exit_hidden,
            positions.targets,
            parameters,
            weights=[exit_weights[k] for k in computed],
            num_items_in_batch=num_items_in_batch,
            options=settings,
            with_deepest_entropy=loss.last_layer_metrics and computed[-1] == head.num_layers,
        )
        last_layer = None
        if loss.last_layer_metrics:
            last_layer = _last_layer_metrics(head, outputs, positions, parameters, settings, terms, computed)
    total, aux_loss = terms.loss, None
    if with_router_logits:
        aux_loss = _router_aux_loss(outputs.router_logits, text_config, kwargs.get("attention_mask"), total.device)
        total = total + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss  # once, not per exit
    return _output(terms, _exit_stats(terms, computed, last_layer), exit_weights, total, aux_loss)
