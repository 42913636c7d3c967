"""Token-chunked cross-entropy over the full vocabulary, recomputed in backward: the CPU path of the exit loss.

TRL's ``ChunkedLogProbFunction`` (used on CUDA/XPU, where it runs Triton kernels) folds ``[tokens, 32768]`` tiles with
about a dozen separate torch element-wise passes when Triton is absent. On CPU this function is faster: each
``[chunk, V]`` block goes through one matmul and PyTorch's fused ``logsumexp`` / ``softmax`` kernels, and the backward
rebuilds the block once. See ``python -m benchmarks.train_cost head-kernel`` for the measurement that picked it.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

__all__ = ["ChunkedCrossEntropy", "chunked_cross_entropy"]

# Tokens per block: 1024 x 49152 fp32 logits is 200 MB, about the size of TRL's own CPU tile
DEFAULT_TOKEN_CHUNK_SIZE = 1024


def _logits(hidden, weight, bias, scale, softcap, dtype):
    """``(n, V)`` float32 logits of one block, with the model's post-processing; also returns ``tanh`` for backward.

    The GEMM runs in ``dtype`` (the autocast dtype when training in bf16) in forward and backward alike, so the
    recomputed block matches the one the forward saw.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(
            hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        ).float()
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits.div_(softcap))
    return tanh * softcap, tanh


def _backward_through_head(grad, tanh, scale, block, weight, dtype, grad_weight, grad_bias, need_hidden):
    """Chain ``d loss / d logits`` of one block back through [`_logits`]: accumulate the head's gradients in place and
    return the block's hidden-state gradient (``None`` when not needed).

    ``grad`` is ``(n, V)`` float32 and is overwritten; the GEMMs run in ``dtype``, as the forward's did, and accumulate
    into the float32 ``grad_weight`` / ``grad_bias``.
    """
    if tanh is not None:  # d (c tanh(z / c)) / dz
        grad.mul_(1 - tanh * tanh)
    if scale != 1.0:
        grad.mul_(scale)
    if grad_bias is not None:
        grad_bias.add_(grad.sum(0))
    grad = grad.to(dtype)
    if grad_weight is not None:
        grad_weight.add_(grad.t() @ block)
    return grad @ weight.to(dtype) if need_hidden else None


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token NLL and top-1 hit of ``hidden @ weight.T (+ bias)``, never holding more than one ``[chunk, V]`` block.

    Forward keeps only ``(N,)`` statistics (logsumexp); backward recomputes each block, turns it into
    ``softmax - onehot`` in place and accumulates the two gradient GEMMs. Under ZeRO-3 the head is gathered again in
    backward, as TRL's kernel does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logit_scale, softcap, chunk_size, with_entropy=False):
        # hidden: (N, H); weight: (V, H); targets: (N,)
        num_tokens = hidden.shape[0]
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        nll = hidden.new_empty(num_tokens, dtype=torch.float32)
        lse = hidden.new_empty(num_tokens, dtype=torch.float32)
        is_top1 = torch.empty(num_tokens, dtype=torch.bool, device=hidden.device)
        entropy = hidden.new_empty(num_tokens, dtype=torch.float32) if with_entropy else None
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits, _ = _logits(hidden[start:end], weight, bias, logit_scale, softcap, dtype)  # (n, V)
            block_targets = targets[start:end]
            target_logits = logits.gather(1, block_targets[:, None]).squeeze(1)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            nll[start:end] = lse[start:end] - target_logits
            # argmax returns the first maximum, as TRL's `is_top1` does
            is_top1[start:end] = logits.argmax(-1) == block_targets
            if entropy is not None:  # a metric only: H = lse - sum(p * z)
                entropy[start:end] = lse[start:end] - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options = (logit_scale, softcap, chunk_size, dtype)
        ctx.mark_non_differentiable(*(t for t in (is_top1, entropy) if t is not None))
        return nll, is_top1, entropy

    @staticmethod
    def backward(ctx, grad_nll, _grad_top1, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        logit_scale, softcap, chunk_size, dtype = ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_hidden else None
        # Under ZeRO-3 the head is partitioned again by now: gather it before sizing its gradient after it
        with maybe_gather_lm_head_ctx(weight, bias):
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                block = hidden[start:end].to(dtype)
                logits, tanh = _logits(block, weight, bias, logit_scale, softcap, dtype)  # (n, V)
                # d nll / d logits = softmax - onehot, scaled by the incoming gradient
                grad = logits.sub_(lse[start:end, None]).exp_()
                grad.scatter_add_(1, targets[start:end, None], grad.new_full((end - start, 1), -1.0))
                grad.mul_(grad_nll[start:end, None])
                block_grad = _backward_through_head(
                    grad, tanh, logit_scale, block, weight, dtype, grad_weight, grad_bias, grad_hidden is not None
                )
                if grad_hidden is not None:
                    grad_hidden[start:end] = block_grad
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    chunk_size: int = DEFAULT_TOKEN_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token NLL ``(N,)`` (differentiable), top-1 hits ``(N,)`` (bool) and, if asked, the entropy ``(N,)``
    (a detached metric) of the logits ``hidden @ weight.T``.

    Args:
        hidden: ``(N, H)`` normed hidden states of labelled positions.
        weight: ``(V, H)`` LM head weight; ``bias``: ``(V,)`` or ``None``.
        targets: ``(N,)`` labels, none of them ``-100``.
        logit_scale: Multiplier applied before softcapping.
        final_logit_softcapping: Softcap ``c`` (``c * tanh(z / c)``) or ``None``.
        chunk_size: Tokens per ``[chunk, V]`` block.
        with_entropy: Also return each token's entropy.
    """
    return ChunkedCrossEntropy.apply(
        hidden, weight, bias, targets, logit_scale, final_logit_softcapping, chunk_size, with_entropy
    )
