"""Token-chunked self-distillation of early exits to the deepest exit, recomputed in backward.

For each early exit ``s`` and each labelled token, ``KL(p_deepest || p_s)`` with both distributions taken over the
full vocabulary at temperature ``T`` (``p = softmax(z / T)`` of the model's post-processed logits ``z``). The deepest
exit is the teacher and is detached: its hidden states get no gradient from this term. Like ``soft_peft.chunked_ce`` no
``[tokens, vocab]`` tensor outlives one ``[chunk, V]`` block: forward keeps ``(N,)`` statistics per exit, backward
rebuilds the teacher block once per chunk and each student block once.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .chunked_ce import _backward_through_head, _logits

__all__ = ["ChunkedSelfDistillation", "chunked_self_distillation"]

# Tokens per block: forward and backward hold about three [chunk, V] fp32 blocks (teacher probabilities, one student
# block, a logsumexp temporary), so half the CE kernel's chunk keeps the peak near the CE's own
DEFAULT_DISTILL_CHUNK_SIZE = 512


def _teacher_block(teacher, weight, bias, scale, softcap, temperature, dtype):
    """Teacher probabilities ``(n, V)``, ``sum p log p`` ``(n,)`` and argmax ``(n,)`` of one block."""
    logits, _ = _logits(teacher, weight, bias, scale, softcap, dtype)  # (n, V)
    top = logits.argmax(-1)
    scaled = logits.div_(temperature)
    lse = torch.logsumexp(scaled, dim=-1)  # (n,)
    probs = (scaled - lse[:, None]).exp_()  # (n, V)
    # sum_v p log p = sum_v p (z / T) - lse, since sum_v p = 1
    neg_entropy = torch.einsum("nv,nv->n", probs, scaled) - lse
    return probs, neg_entropy, top


class ChunkedSelfDistillation(torch.autograd.Function):
    """Per-token ``KL(p_teacher || p_student)`` at temperature ``T`` for several students sharing one head.

    Differentiable in the students' hidden states and in the head (weight, bias), never in the teacher. Under ZeRO-3
    the head is gathered again in backward, as in ``soft_peft.chunked_ce``.
    """

    @staticmethod
    def forward(ctx, teacher, weight, bias, logit_scale, softcap, temperature, chunk_size, *students):
        # teacher, students[i]: (N, H); weight: (V, H)
        num_tokens = teacher.shape[0]
        device_type = teacher.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else teacher.dtype
        kl = teacher.new_empty(len(students), num_tokens, dtype=torch.float32)
        student_lse = teacher.new_empty(len(students), num_tokens, dtype=torch.float32)
        agree = torch.empty(len(students), num_tokens, dtype=torch.bool, device=teacher.device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            probs, neg_entropy, top = _teacher_block(
                teacher[start:end], weight, bias, logit_scale, softcap, temperature, dtype
            )
            for index, student in enumerate(students):
                logits, _ = _logits(student[start:end], weight, bias, logit_scale, softcap, dtype)  # (n, V)
                agree[index, start:end] = logits.argmax(-1) == top
                scaled = logits.div_(temperature)
                lse = torch.logsumexp(scaled, dim=-1)
                student_lse[index, start:end] = lse
                # KL = sum p_t log p_t - sum p_t log p_s, and sum p_t log p_s = sum p_t (z_s / T) - lse_s
                kl[index, start:end] = neg_entropy - (torch.einsum("nv,nv->n", probs, scaled) - lse)
        ctx.save_for_backward(teacher, weight, bias, student_lse, *students)
        ctx.options = (logit_scale, softcap, temperature, chunk_size, dtype)
        ctx.mark_non_differentiable(agree)
        return kl, agree

    @staticmethod
    def backward(ctx, grad_kl, _grad_agree):
        teacher, weight, bias, student_lse, *students = ctx.saved_tensors
        logit_scale, softcap, temperature, chunk_size, dtype = ctx.options
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        need_students = ctx.needs_input_grad[7:]
        grad_students = [
            torch.zeros_like(s, dtype=torch.float32) if need else None
            for s, need in zip(students, need_students, strict=True)
        ]
        # Under ZeRO-3 the head is partitioned again by now: gather it before sizing its gradient after it
        with maybe_gather_lm_head_ctx(weight, bias):
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
            for start in range(0, teacher.shape[0], chunk_size):
                end = min(start + chunk_size, teacher.shape[0])
                teacher_probs, _, _ = _teacher_block(
                    teacher[start:end], weight, bias, logit_scale, softcap, temperature, dtype
                )
                for index, student in enumerate(students):
                    block = student[start:end].to(dtype)
                    logits, tanh = _logits(block, weight, bias, logit_scale, softcap, dtype)  # (n, V)
                    # d KL / d z = (p_s - p_t) / T, scaled by the incoming gradient
                    grad = logits.div_(temperature).sub_(student_lse[index, start:end, None]).exp_()
                    grad.sub_(teacher_probs).mul_(grad_kl[index, start:end, None] / temperature)
                    need_hidden = grad_students[index] is not None
                    block_grad = _backward_through_head(
                        grad, tanh, logit_scale, block, weight, dtype, grad_weight, grad_bias, need_hidden
                    )
                    if need_hidden:
                        grad_students[index][start:end] = block_grad
        return (
            None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            *(None if g is None else g.to(s.dtype) for g, s in zip(grad_students, students, strict=True)),
        )


def chunked_self_distillation(
    teacher: torch.Tensor,
    students: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_DISTILL_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``KL(p_teacher || p_student)`` of each student, and whether its argmax is the teacher's.

    Args:
        teacher: ``(N, H)`` normed hidden states of the deepest exit at the labelled positions; used detached.
        students: One ``(N, H)`` tensor per early exit, normed, same positions.
        weight: ``(V, H)`` shared LM head weight; ``bias``: ``(V,)`` or ``None``.
        logit_scale: Multiplier applied to the logits before softcapping.
        final_logit_softcapping: Softcap ``c`` (``c * tanh(z / c)``) or ``None``.
        temperature: ``T``: both distributions are ``softmax(z / T)``.
        chunk_size: Tokens per ``[chunk, V]`` block.

    Returns:
        ``kl``: ``(S, N)`` float32, differentiable in the students and the head; ``agree``: ``(S, N)`` bool, the
        student's argmax equals the teacher's (first maximum on ties, computed before the temperature).
    """
    if temperature <= 0:
        raise ValueError(f"The distillation temperature must be > 0, got {temperature}.")
    return ChunkedSelfDistillation.apply(
        teacher.detach(), weight, bias, logit_scale, final_logit_softcapping, temperature, chunk_size, *students
    )
