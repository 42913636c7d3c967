"""The exit loss with each head kernel against a plain `F.cross_entropy` reference, on the CPU and on CUDA.

On CUDA `kernel="trl"` is TRL's Triton `ChunkedLogProbFunction` (what `exit_loss_kernel="auto"` picks there) and
`kernel="torch"` is `soft_peft.chunked_ce`. fp32 is checked against a float64 computation with tight tolerances. In
bf16 no kernel can be exact, so, as Cut Cross-Entropy's tests do, each kernel's error against float64 (from the same
bf16 inputs) is bounded by a multiple of the error of the plain bf16 reference (`F.linear` + `F.cross_entropy` run in
bf16), the error everyone already accepts when training in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_devices import CUDA

from soft_peft.loss import ExitLossOptions, HeadParameters, sorted_exit_loss

# Odd shapes: 1_003 columns are one ragged 32_768-column vocabulary tile, 40_003 two (CUDA only: slow on the CPU)
SMALL, LARGE = (37, 24, 1_003), (129, 64, 40_003)
CASES = [
    pytest.param("cpu", *SMALL, id="cpu-small"),
    pytest.param(*CUDA.values, *SMALL, marks=CUDA.marks, id="cuda-small"),
    pytest.param(*CUDA.values, *LARGE, marks=CUDA.marks, id="cuda-large"),
]
# A kernel may be at most this many times less accurate than the plain bf16 reference
BF16_ERROR_FACTOR = 2.0


def make_inputs(tokens, hidden_size, vocab, device, dtype, num_exits=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(tokens, hidden_size, generator=generator) for _ in range(num_exits)]  # each (N, H)
    # Scaled so that the logits spread over several nats, like a trained head's
    weight = torch.randn(vocab, hidden_size, generator=generator) * (3.0 / hidden_size**0.5)  # (V, H)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    hidden = [h.to(device, dtype).requires_grad_() for h in hidden]
    return hidden, weight.to(device, dtype).requires_grad_(), targets.to(device)


def reference(hidden, weight, targets, compute_dtype):
    """Mean over exits of `F.cross_entropy(hidden @ weight.T)`, everything in `compute_dtype`; loss and grads."""
    leaves = [h.detach().to(compute_dtype).requires_grad_() for h in hidden]
    head = weight.detach().to(compute_dtype).requires_grad_()
    exit_losses = [F.cross_entropy(F.linear(h, head), targets) for h in leaves]  # each scalar
    loss = sum(exit_losses) / len(exit_losses)
    grads = torch.autograd.grad(loss, [*leaves, head])
    return loss.detach().double(), [e.detach().double() for e in exit_losses], [g.double() for g in grads]


def kernel_loss(hidden, weight, targets, kernel):
    options = ExitLossOptions(exit_loss_kernel=kernel)
    out = sorted_exit_loss(hidden, targets, HeadParameters(weight), options=options, token_chunk_size=50)  # 3+ blocks
    grads = torch.autograd.grad(out.loss, [*hidden, weight])
    return out.loss.detach().double(), [e.detach().double() for e in out.exit_losses], [g.double() for g in grads]


def relative_error(got, exact):
    return float((got - exact).norm() / exact.norm())


@pytest.mark.parametrize("kernel", ["trl", "torch"])
@pytest.mark.parametrize("device, tokens, hidden_size, vocab", CASES)
def test_fp32_matches_float64_reference(device, kernel, tokens, hidden_size, vocab):
    hidden, weight, targets = make_inputs(tokens, hidden_size, vocab, device, torch.float32)
    loss, exit_losses, grads = kernel_loss(hidden, weight, targets, kernel)
    exact_loss, exact_exit_losses, exact_grads = reference(hidden, weight, targets, torch.float64)
    torch.testing.assert_close(loss, exact_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(exit_losses), torch.stack(exact_exit_losses), rtol=1e-5, atol=1e-6)
    for got, exact in zip(grads, exact_grads, strict=True):
        assert relative_error(got, exact) < 1e-4


@pytest.mark.parametrize("kernel", ["trl", "torch"])
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
@pytest.mark.parametrize("device, tokens, hidden_size, vocab", CASES)
def test_bf16_error_is_bounded_by_the_plain_bf16_reference(device, kernel, precision, tokens, hidden_size, vocab):
    """`bf16`: a model loaded in bf16; `autocast`: fp32 weights under bf16 autocast (Trainer's `bf16=True`)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hidden, weight, targets = make_inputs(tokens, hidden_size, vocab, device, dtype)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "autocast"):
        loss, exit_losses, grads = kernel_loss(hidden, weight, targets, kernel)
    # Both references see the bf16-rounded inputs the kernel's GEMMs see
    rounded = [h.detach().bfloat16() for h in hidden]
    rounded_weight = weight.detach().bfloat16()
    exact_loss, exact_exit_losses, exact_grads = reference(rounded, rounded_weight, targets, torch.float64)
    bf16_loss, bf16_exit_losses, bf16_grads = reference(rounded, rounded_weight, targets, torch.bfloat16)

    # A scalar bf16 result is off by up to half a bf16 step (2^-8 relative) even when computed exactly
    half_step = 2.0**-9 * float(exact_loss.abs())
    assert abs(float(loss - exact_loss)) <= BF16_ERROR_FACTOR * max(abs(float(bf16_loss - exact_loss)), half_step)
    for got, plain, exact in zip(exit_losses, bf16_exit_losses, exact_exit_losses, strict=True):
        assert abs(float(got - exact)) <= BF16_ERROR_FACTOR * max(abs(float(plain - exact)), half_step)
    for got, plain, exact in zip(grads, bf16_grads, exact_grads, strict=True):
        assert relative_error(got, exact) <= BF16_ERROR_FACTOR * relative_error(plain, exact)
    # The bound means something: the plain bf16 reference itself is far from float64
    assert relative_error(bf16_grads[-1], exact_grads[-1]) > 1e-3
