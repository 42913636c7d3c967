"""The nested-exit SoFT loss as a pure function: normed exit hidden states and the shared head in, losses out.

No exit ever holds a ``[batch, seq, vocab]`` logits tensor: only labelled positions reach the head, in chunks that
are recomputed in backward. Two kernels do that, chosen per device (``kernel="auto"``):

* CUDA/XPU with Triton: TRL's ``ChunkedLogProbFunction`` (``trl.kernels``), the kernel behind ``SFTTrainer``'s fused
  LM head, reused as is.
* elsewhere (CPU): ``soft_peft.chunked_ce``. Without Triton, TRL's kernel folds its tiles with a dozen torch
  element-wise passes; measured side by side (``benchmarks/head_kernel.py``, SmolLM2-135M head, 8 exits x 700
  labelled tokens, forward + backward on this project's 2-core CPU) it took 50.5 s in bf16 and 49.4 s in fp32, against
  11.1 s and 32.8 s for ``chunked_ce``, which also peaked ~400 MB lower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import _use_triton

from .chunked_ce import DEFAULT_TOKEN_CHUNK_SIZE, chunked_cross_entropy

__all__ = ["KERNELS", "SortedExitLoss", "exit_loss_weights", "sorted_exit_loss"]

KERNELS = ("auto", "trl", "torch")

# Vocabulary columns per projection tile, as in TRL's fused head
DEFAULT_VOCAB_CHUNK_SIZE = 32768


def exit_loss_weights(spec: str | Sequence[float], exit_layers: Sequence[int]) -> list[float]:
    """Normalised per-exit loss weights.

    Args:
        spec: ``"uniform"`` (the paper: the mean over exits), ``"linear"`` (weight proportional to the exit's depth,
            so deeper exits weigh more), a comma-separated string ``"1,1,2"`` or a list with one non-negative weight
            per exit.
        exit_layers: The exits, ascending.

    Returns:
        Weights summing to 1, one per exit.

    Raises:
        ValueError: for an unknown name, a wrong count, a negative weight or a zero sum.
    """
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == "uniform":
            raw = [1.0] * len(exit_layers)
        elif name == "linear":
            raw = [float(k) for k in exit_layers]
        else:
            try:
                raw = [float(w) for w in name.replace(" ", ",").split(",") if w]
            except ValueError:
                raise ValueError(
                    f"exit_loss_weights={spec!r} is not 'uniform', 'linear' or a list of numbers such as '1,1,2'."
                ) from None
    else:
        raw = [float(w) for w in spec]
    if len(raw) != len(exit_layers):
        raise ValueError(
            f"exit_loss_weights has {len(raw)} values but there are {len(exit_layers)} exits {list(exit_layers)}: "
            "give one weight per exit, or 'uniform' / 'linear'."
        )
    if any(w < 0 or w != w for w in raw):
        raise ValueError(f"exit_loss_weights={raw} has a negative or NaN weight; weights must be >= 0.")
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"exit_loss_weights={raw} sums to {total}; at least one weight must be positive.")
    return [w / total for w in raw]


@dataclass
class SortedExitLoss:
    """Result of [`sorted_exit_loss`].

    Attributes:
        loss: Scalar, the weighted combination of the exits' losses, normalised like ``SFTTrainer``'s loss.
        exit_losses: One scalar per exit: the mean token cross-entropy over this batch's labelled tokens.
        exit_nll_sums: One detached scalar per exit: the summed token NLL (for exact cross-rank averaging).
        exit_num_correct: One detached scalar per exit: labelled tokens whose label is the exit's argmax.
        num_tokens: Detached scalar, the number of labelled tokens in this batch.
        last_entropy: Detached summed entropy of the last exit, when requested, else ``None``.
    """

    loss: torch.Tensor
    exit_losses: list[torch.Tensor]
    exit_nll_sums: list[torch.Tensor]
    exit_num_correct: list[torch.Tensor]
    num_tokens: torch.Tensor
    last_entropy: torch.Tensor | None = None


def sorted_exit_loss(
    exit_hidden: Sequence[torch.Tensor],
    targets: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    token_weighting: str = "nll",
    with_last_entropy: bool = False,
    kernel: str = "auto",
    token_chunk_size: int = DEFAULT_TOKEN_CHUNK_SIZE,
) -> SortedExitLoss:
    """Weighted mean over exits of each exit's token cross-entropy, without materialising logits.

    Args:
        exit_hidden: One ``(N, H)`` tensor per exit: the *normed* hidden states of the ``N`` labelled positions
            (already shifted so that position ``i`` predicts ``targets[i]``).
        targets: ``(N,)`` int64 next-token labels, none of them ``-100``.
        lm_head_weight: ``(V, H)`` shared head weight. Under ZeRO-3 the caller gathers it.
        lm_head_bias: ``(V,)`` head bias or ``None``.
        weights: One weight per exit, summing to 1 (see [`exit_loss_weights`]); uniform when ``None``.
        num_items_in_batch: The token count the Trainer passes under gradient accumulation; each exit's summed NLL
            is divided by it, exactly as ``SFTTrainer`` does, instead of by ``N``.
        final_logit_softcapping: Gemma-2/3 softcap, or ``None``.
        logit_scale: Multiplier applied to the logits before softcapping.
        vocab_chunk_size: Vocabulary columns per projection tile (TRL kernel).
        token_weighting: ``"nll"`` or ``"dft"`` (TRL's ``loss_type="dft"``: each token's NLL times its detached
            probability).
        with_last_entropy: Also return the last exit's summed entropy (``SFTTrainer``'s ``entropy`` metric).
        kernel: ``"trl"`` (TRL's ``ChunkedLogProbFunction``), ``"torch"`` (``soft_peft.chunked_ce``) or ``"auto"``:
            TRL's on devices where it runs Triton, ``"torch"`` elsewhere (see the module docstring for why).
        token_chunk_size: Tokens per ``[chunk, vocab]`` block (``"torch"`` kernel).

    Returns:
        A [`SortedExitLoss`]. With ``N == 0`` the loss is a finite, differentiable zero.
    """
    if not exit_hidden:
        raise ValueError("sorted_exit_loss needs at least one exit.")
    num_exits = len(exit_hidden)
    weights = [1.0 / num_exits] * num_exits if weights is None else list(weights)
    if len(weights) != num_exits:
        raise ValueError(f"Got {len(weights)} weights for {num_exits} exits.")
    if token_weighting not in ("nll", "dft"):
        raise ValueError(f"token_weighting must be 'nll' or 'dft', got {token_weighting!r}.")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if kernel == "auto":
        kernel = "trl" if _use_triton(targets.device) else "torch"
    num_tokens = targets.new_tensor(targets.numel())
    # Clamped so that an all-masked batch reduces to a finite zero rather than 0 / 0
    denominator = (num_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)).clamp(min=1)
    mean_denominator = num_tokens.clamp(min=1)

    loss = None
    exit_losses, nll_sums, num_correct = [], [], []
    last_entropy = None
    for index, hidden in enumerate(exit_hidden):  # hidden: (N, H)
        is_last = index == num_exits - 1
        want_entropy = is_last and with_last_entropy
        if kernel == "trl":
            outputs = ("is_top1", "entropy") if want_entropy else ("is_top1",)
            log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
                hidden,
                lm_head_weight,
                lm_head_bias,
                targets,
                1.0,
                vocab_chunk_size,
                final_logit_softcapping,
                logit_scale,
                outputs,
            )  # each (N,)
            nll = -log_probs
        else:
            nll, is_top1, entropy = chunked_cross_entropy(
                hidden,
                lm_head_weight,
                lm_head_bias,
                targets,
                logit_scale,
                final_logit_softcapping,
                token_chunk_size,
                with_entropy=want_entropy,
            )  # each (N,)
            log_probs = -nll
        if token_weighting == "dft":
            nll = nll * log_probs.detach().exp()
        nll_sum = nll.sum()
        term = weights[index] * nll_sum / denominator
        loss = term if loss is None else loss + term
        exit_losses.append(nll_sum / mean_denominator)
        nll_sums.append(nll_sum.detach())
        num_correct.append(is_top1.sum())
        if entropy is not None:
            last_entropy = entropy.detach().sum()
    return SortedExitLoss(
        loss=loss,
        exit_losses=exit_losses,
        exit_nll_sums=nll_sums,
        exit_num_correct=num_correct,
        num_tokens=num_tokens,
        last_entropy=last_entropy,
    )
