"""The nested-exit SoFT loss as a pure function: normed exit hidden states and the shared head in, losses out.

No exit ever holds a ``[batch, seq, vocab]`` logits tensor: only labelled positions reach the head, in chunks that
are recomputed in backward. Two kernels do that, chosen per device (``kernel="auto"``):

* CUDA/XPU with Triton: TRL's ``ChunkedLogProbFunction`` (``trl.kernels``), the kernel behind ``SFTTrainer``'s fused
  LM head, reused as is.
* elsewhere (CPU): ``soft_peft.chunked_ce``. Without Triton, TRL's kernel folds its tiles with a dozen torch
  element-wise passes, which is slower and uses more memory on a CPU (``python -m benchmarks.train_cost
  head-kernel`` measures both; figures in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.utils import is_triton_available
from trl.kernels import ChunkedLogProbFunction

from .chunked_ce import DEFAULT_TOKEN_CHUNK_SIZE, chunked_cross_entropy
from .chunked_distill import DEFAULT_DISTILL_CHUNK_SIZE, chunked_self_distillation

__all__ = [
    "DEFAULT_VOCAB_CHUNK_SIZE",
    "HEAD_GRAD_MODES",
    "KERNELS",
    "LOSS_TYPES",
    "ExitLossOptions",
    "ExitLossTerms",
    "HeadParameters",
    "gradient_blocked",
    "sorted_exit_loss",
]

KERNELS = ("auto", "trl", "torch")

# Read once, as TRL does: `is_triton_available` is cached and Dynamo warns when it traces a call to it
_TRITON_AVAILABLE = is_triton_available()


def _triton_runs_on(device: torch.device) -> bool:
    """Whether TRL's ``ChunkedLogProbFunction`` runs its Triton kernels on ``device`` (its own rule, public inputs)."""
    return device.type in ("cuda", "xpu") and _TRITON_AVAILABLE


# "last": only the deepest exit (the last one in `exit_layers` order of depth) updates the shared norm and head
HEAD_GRAD_MODES = ("all", "last")
# TRL's `loss_type` values SoFT computes at every exit. "dft": each token's NLL times its detached probability
LOSS_TYPES = ("nll", "dft")

# Vocabulary columns per projection tile, as in TRL's fused head
DEFAULT_VOCAB_CHUNK_SIZE = 32768


@dataclass
class ExitLossOptions:
    r"""
    The knobs of [`sorted_exit_loss`]: loss type, head kernel, and what each early exit learns. Validated when built.
    [`~soft_peft.settings.SoFTSettings`] extends it with the exits, their weights, the schedule and layer dropout, so
    each knob has one name from the command line down to the loss. The fields are documented, with their
    command-line help, on `SoFTSettings`, where every SoFT setting is declared; this small object carries no help
    text, so the pure loss never imports the settings.
    """

    loss_type: str = "nll"
    exit_loss_kernel: str = "auto"
    exit_vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE
    exit_head_grad: str = "all"
    exit_distill_weight: float = 0.0
    exit_distill_temperature: float = 1.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} (the TRL loss types SoFT computes at every exit), got "
                f"{self.loss_type!r}."
            )
        if self.exit_loss_kernel not in KERNELS:
            raise ValueError(f"exit_loss_kernel must be one of {KERNELS}, got {self.exit_loss_kernel!r}.")
        chunk = self.exit_vocab_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"exit_vocab_chunk_size must be a positive integer, got {chunk!r}.")
        if self.exit_head_grad not in HEAD_GRAD_MODES:
            raise ValueError(f"exit_head_grad must be one of {HEAD_GRAD_MODES}, got {self.exit_head_grad!r}.")
        if not 0.0 <= self.exit_distill_weight <= 1.0:
            raise ValueError(
                "exit_distill_weight must be in [0, 1] (0 = off, 1 = early exits learn only from the deepest exit), "
                f"got {self.exit_distill_weight}."
            )
        if not self.exit_distill_temperature > 0:
            raise ValueError(f"exit_distill_temperature must be > 0, got {self.exit_distill_temperature}.")


class HeadParameters(NamedTuple):
    """The shared LM head as [`sorted_exit_loss`] applies it, with the model's logit post-processing.

    Attributes:
        weight: ``(V, H)`` head weight. Under ZeRO-3 the caller gathers it.
        bias: ``(V,)`` head bias, or ``None``.
        final_logit_softcapping: Gemma-2/3 softcap ``c`` (logits become ``c * tanh(logits / c)``), or ``None``.
        logit_scale: Multiplier applied to the logits before softcapping.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    final_logit_softcapping: float | None = None
    logit_scale: float = 1.0


@contextlib.contextmanager
def gradient_blocked(*tensors: torch.Tensor | None) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """Use ``tensors`` without recording a gradient to them; gradients still reach the other inputs of each op.

    A leaf that requires grad (a parameter) has ``requires_grad`` switched off inside the block and back on after it,
    rather than being replaced by ``detach()``: it stays the same object, so ZeRO-3 can gather it again when a
    kernel's backward needs its values. Any other tensor (e.g. FSDP2's ``full_tensor()``) is yielded detached.

    Args:
        *tensors: Tensors or ``None``.

    Yields:
        The tensors to use inside the block, in the same order.
    """
    switched = [t for t in {id(t): t for t in tensors if t is not None}.values() if t.is_leaf and t.requires_grad]
    for tensor in switched:
        tensor.requires_grad_(False)
    try:
        yield tuple(t if t is None or t.is_leaf else t.detach() for t in tensors)
    finally:
        for tensor in switched:
            tensor.requires_grad_(True)


@dataclass
class ExitLossTerms:
    """Result of [`sorted_exit_loss`].

    Attributes:
        loss: Scalar, the weighted combination of the exits' losses, normalised like ``SFTTrainer``'s loss.
        exit_losses: One scalar per exit: the mean token cross-entropy over this batch's labelled tokens.
        exit_nll_sums: One detached scalar per exit: the summed token NLL (for exact cross-rank averaging).
        exit_num_correct: One detached scalar per exit: labelled tokens whose label is the exit's argmax.
        num_tokens: Detached scalar, the number of labelled tokens in this batch.
        deepest_entropy_sum: Detached summed entropy of the deepest exit, when requested, else ``None``.
        exit_kl_sums: With self-distillation, one detached scalar per early exit: the summed per-token
            ``T^2 * KL(p_deepest || p_exit)``; else ``None``.
        exit_num_agree: With self-distillation, one detached scalar per early exit: labelled tokens whose argmax is
            the deepest exit's argmax; else ``None``.
    """

    loss: torch.Tensor
    exit_losses: list[torch.Tensor]
    exit_nll_sums: list[torch.Tensor]
    exit_num_correct: list[torch.Tensor]
    num_tokens: torch.Tensor
    deepest_entropy_sum: torch.Tensor | None = None
    exit_kl_sums: list[torch.Tensor] | None = None
    exit_num_agree: list[torch.Tensor] | None = None


def _exit_cross_entropy(hidden, targets, head: HeadParameters, kernel, vocab_chunk_size, token_chunk_size, entropy):
    """One exit's per-token NLL ``(N,)`` (differentiable), log-probabilities, top-1 hits and optional entropy."""
    softcap, logit_scale = head.final_logit_softcapping, head.logit_scale
    if kernel == "trl":
        outputs = ("is_top1", "entropy") if entropy else ("is_top1",)
        log_probs, entropies, _, _, is_top1 = ChunkedLogProbFunction.apply(
            hidden, head.weight, head.bias, targets, 1.0, vocab_chunk_size, softcap, logit_scale, outputs
        )  # each (N,)
        return -log_probs, log_probs, is_top1, entropies
    nll, is_top1, entropies = chunked_cross_entropy(
        hidden, head.weight, head.bias, targets, logit_scale, softcap, token_chunk_size, with_entropy=entropy
    )  # each (N,)
    return nll, -nll, is_top1, entropies


def sorted_exit_loss(
    exit_hidden: Sequence[torch.Tensor],
    targets: torch.Tensor,
    head: HeadParameters,
    weights: Sequence[float] | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    options: ExitLossOptions | None = None,
    *,
    with_deepest_entropy: bool = False,
    token_chunk_size: int = DEFAULT_TOKEN_CHUNK_SIZE,
    distill_chunk_size: int = DEFAULT_DISTILL_CHUNK_SIZE,
) -> ExitLossTerms:
    """Weighted mean over exits of each exit's token loss, without materialising logits.

    With ``w_k`` the exit weights (summing to 1), ``D`` the normaliser (``num_items_in_batch``, else the ``N``
    labelled tokens here), ``CE_k`` and ``KL_k`` exit ``k``'s summed token cross-entropy and summed
    ``T^2 * KL(p_deepest || p_k)`` (``p = softmax(z / T)``, ``p_deepest`` detached) and
    ``lambda = options.exit_distill_weight``::

        loss = w_deepest * CE_deepest / D + sum over early exits k of w_k * ((1 - lambda) * CE_k + lambda * KL_k) / D

    With the defaults (``lambda = 0``, ``exit_head_grad="all"``) this is the paper's weighted mean of cross-entropies,
    and with a single exit every option reduces to plain SFT's loss.

    Args:
        exit_hidden: One ``(N, H)`` tensor per exit, ascending, the last one the deepest: the *normed* hidden states
            of the ``N`` labelled positions (already shifted so that position ``i`` predicts ``targets[i]``).
        targets: ``(N,)`` int64 next-token labels, none of them ``-100``.
        head: The shared head's [`HeadParameters`] (weight ``(V, H)``, bias, softcap, logit scale).
        weights: One weight per exit, summing to 1 (see [`~soft_peft.exit_weights.exit_loss_weights`]); uniform
            when ``None``.
        num_items_in_batch: The token count the Trainer passes under gradient accumulation; each exit's summed loss
            is divided by it, exactly as ``SFTTrainer`` does, instead of by ``N``.
        options: The [`ExitLossOptions`] (loss type, kernel, head gradient, self-distillation); ``None`` is the
            defaults. ``exit_loss_kernel="auto"`` is TRL's kernel on devices where it runs Triton, ``"torch"``
            elsewhere (see the module docstring for why). With ``exit_head_grad="last"`` the early exits use the
            head weight and bias without updating them (their gradient still reaches ``exit_hidden``).
        with_deepest_entropy: Also return the deepest exit's summed entropy (``SFTTrainer``'s ``entropy`` metric
            when the deepest exit is the model's last layer).
        token_chunk_size: Tokens per ``[chunk, vocab]`` block (``"torch"`` kernel).
        distill_chunk_size: Tokens per ``[chunk, vocab]`` block of the distillation kernel.

    Returns:
        An [`ExitLossTerms`]. With ``N == 0`` the loss is a finite, differentiable zero.

    Raises:
        ValueError: for no exit, or a weight count that is not one per exit.
    """
    if not exit_hidden:
        raise ValueError("sorted_exit_loss needs at least one exit.")
    options = ExitLossOptions() if options is None else options
    num_exits = len(exit_hidden)
    weights = [1.0 / num_exits] * num_exits if weights is None else list(weights)
    if len(weights) != num_exits:
        raise ValueError(f"Got {len(weights)} weights for {num_exits} exits.")
    kernel = options.exit_loss_kernel
    if kernel == "auto":
        kernel = "trl" if _triton_runs_on(targets.device) else "torch"

    def cross_entropy(hidden, exit_head, entropy=False):
        return _exit_cross_entropy(
            hidden, targets, exit_head, kernel, options.exit_vocab_chunk_size, token_chunk_size, entropy
        )

    distill_weight = options.exit_distill_weight if num_exits > 1 else 0.0
    # The early exits see the head through `gradient_blocked` when only the deepest exit may update it
    early_head = (
        gradient_blocked(head.weight, head.bias)
        if options.exit_head_grad == "last"
        else contextlib.nullcontext((head.weight, head.bias))
    )
    with early_head as (early_weight, early_bias):
        blocked = head._replace(weight=early_weight, bias=early_bias)
        per_exit = [cross_entropy(hidden, blocked) for hidden in exit_hidden[:-1]]
        if distill_weight > 0:
            kl, agree = chunked_self_distillation(
                exit_hidden[-1],
                list(exit_hidden[:-1]),
                early_weight,
                early_bias,
                head.logit_scale,
                head.final_logit_softcapping,
                options.exit_distill_temperature,
                distill_chunk_size,
            )  # each (E - 1, N)
    per_exit.append(cross_entropy(exit_hidden[-1], head, with_deepest_entropy))
    num_tokens = targets.new_tensor(targets.numel())
    # Clamped so that an all-masked batch reduces to a finite zero rather than 0 / 0
    denominator = (num_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)).clamp(min=1)
    terms, result = _cross_entropy_terms(
        per_exit, weights, options.loss_type, distill_weight, denominator, num_tokens.clamp(min=1)
    )
    if distill_weight > 0:
        result.exit_kl_sums, result.exit_num_agree = [], []
        for index in range(num_exits - 1):
            kl_sum = options.exit_distill_temperature**2 * kl[index].sum()
            if weights[index] > 0:
                terms.append(weights[index] * distill_weight * kl_sum / denominator)
            result.exit_kl_sums.append(kl_sum.detach())
            result.exit_num_agree.append(agree[index].sum())
    result.loss = sum(terms[1:], terms[0])
    result.num_tokens = num_tokens
    deepest_entropy = per_exit[-1][3]
    result.deepest_entropy_sum = None if deepest_entropy is None else deepest_entropy.detach().sum()
    return result


def _cross_entropy_terms(per_exit, weights, loss_type, distill_weight, denominator, mean_denominator):
    """The exits' weighted cross-entropy terms of the loss, and an [`ExitLossTerms`] with their per-exit sums."""
    result = ExitLossTerms(loss=None, exit_losses=[], exit_nll_sums=[], exit_num_correct=[], num_tokens=None)
    terms = []
    for index, (nll, log_probs, is_top1, _) in enumerate(per_exit):
        deepest = index == len(per_exit) - 1
        if loss_type == "dft":
            nll = nll * log_probs.detach().exp()
        nll_sum = nll.sum()
        coefficient = weights[index] * (1.0 if deepest else 1.0 - distill_weight)
        if coefficient > 0 or deepest:  # a zero coefficient would only run a backward of zeros
            terms.append(coefficient * nll_sum / denominator)
        result.exit_losses.append(nll_sum / mean_denominator)
        result.exit_nll_sums.append(nll_sum.detach())
        result.exit_num_correct.append(is_top1.sum())
    return terms, result
