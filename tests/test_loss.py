"""`sorted_exit_loss` against a plain reference: full logits + F.cross_entropy per exit, weighted mean."""

import pytest
import torch
import torch.nn.functional as F

from soft_peft.exit_weights import exit_loss_weights
from soft_peft.loss import ExitLossOptions, HeadParameters, sorted_exit_loss


def reference(hidden, targets, weight, bias, weights, denominator, softcap=None, scale=1.0):
    total = 0.0
    for w, h in zip(weights, hidden, strict=True):
        logits = F.linear(h, weight, bias) * scale  # (N, V)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + w * F.cross_entropy(logits, targets, reduction="sum") / denominator
    return total


def options(kernel, **controls):
    return ExitLossOptions(exit_loss_kernel=kernel, **controls)


def make_inputs(num_exits, n, hidden_size, vocab, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(n, hidden_size, generator=g, requires_grad=True) for _ in range(num_exits)]
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.5).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("kernel", ["trl", "torch"])
@pytest.mark.parametrize(
    "num_exits, n, hidden_size, vocab, chunk, bias, softcap, scale, weights",
    [
        (3, 17, 8, 37, 10, False, None, 1.0, "uniform"),  # ragged vocabulary chunks
        (1, 5, 16, 64, 64, True, None, 1.0, "uniform"),
        (4, 33, 12, 101, 32768, False, 3.0, 1.0, "linear"),  # Gemma-style softcap
        (2, 9, 8, 50, 7, True, None, 0.25, [1.0, 3.0]),  # Granite/Cohere-style scale
    ],
)
def test_loss_and_gradients_match_reference(
    num_exits, n, hidden_size, vocab, chunk, bias, softcap, scale, weights, kernel
):
    hidden, weight, b, targets = make_inputs(num_exits, n, hidden_size, vocab, bias)
    w = exit_loss_weights(weights, list(range(1, num_exits + 1)))
    out = sorted_exit_loss(
        hidden,
        targets,
        HeadParameters(weight, b, final_logit_softcapping=softcap, logit_scale=scale),
        weights=w,
        options=ExitLossOptions(exit_loss_kernel=kernel, exit_vocab_chunk_size=chunk),
        token_chunk_size=max(1, n // 3),  # several token blocks
        with_deepest_entropy=True,
    )
    params = [*hidden, weight] + ([b] if bias else [])
    grads = torch.autograd.grad(out.loss, params)

    ref = reference(hidden, targets, weight, b, w, n, softcap, scale)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for h, exit_loss, correct in zip(hidden, out.exit_losses, out.exit_num_correct, strict=True):
        logits = F.linear(h, weight, b) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        torch.testing.assert_close(exit_loss, F.cross_entropy(logits, targets), rtol=1e-5, atol=1e-5)
        assert int(correct) == int((logits.argmax(-1) == targets).sum())
    entropy = torch.distributions.Categorical(logits=logits).entropy().sum()
    torch.testing.assert_close(out.deepest_entropy_sum, entropy, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_num_items_in_batch_replaces_the_local_token_count(kernel):
    hidden, weight, _, targets = make_inputs(2, 6, 8, 20, False)
    out = sorted_exit_loss(hidden, targets, HeadParameters(weight), num_items_in_batch=24, options=options(kernel))
    ref = reference(hidden, targets, weight, None, [0.5, 0.5], 24)
    torch.testing.assert_close(out.loss, ref)
    # exit_losses stay per-batch means whatever the normaliser
    torch.testing.assert_close(out.exit_losses[0] * 6 / 24 * 0.5 + out.exit_losses[1] * 6 / 24 * 0.5, ref)


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_all_masked_batch_gives_finite_differentiable_zero(kernel):
    hidden = [torch.randn(0, 8, requires_grad=True) for _ in range(3)]
    weight = torch.randn(20, 8, requires_grad=True)
    out = sorted_exit_loss(hidden, torch.zeros(0, dtype=torch.long), HeadParameters(weight), options=options(kernel))
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.count_nonzero(weight.grad) == 0
    assert all(loss.item() == 0.0 for loss in out.exit_losses)


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_dft_weights_tokens_by_their_probability(kernel):
    hidden, weight, _, targets = make_inputs(1, 7, 8, 20, False)
    out = sorted_exit_loss(hidden, targets, HeadParameters(weight), options=options(kernel, loss_type="dft"))
    logp = F.log_softmax(F.linear(hidden[0], weight), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(out.loss, (-logp * logp.detach().exp()).sum() / 7)


# --- Quality controls: last-layer share, head gradient from the last exit only, self-distillation ---


def controls_reference(hidden, targets, weight, bias, weights, denominator, head_grad, distill, temperature, softcap):
    """Full logits per exit; early exits see a detached head with head_grad="last"; F.kl_div for the distillation."""

    def logits_of(h, w, b):
        z = F.linear(h, w, b)  # (N, V)
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    last = logits_of(hidden[-1], weight, bias)
    teacher = F.log_softmax(last.detach() / temperature, -1)
    total = weights[-1] * F.cross_entropy(last, targets, reduction="sum") / denominator
    agreement = []
    for w, h in zip(weights[:-1], hidden[:-1], strict=True):
        if head_grad == "last":
            z = logits_of(h, weight.detach(), None if bias is None else bias.detach())
        else:
            z = logits_of(h, weight, bias)
        ce = F.cross_entropy(z, targets, reduction="sum")
        kl = F.kl_div(F.log_softmax(z / temperature, -1), teacher, log_target=True, reduction="sum")
        total = total + w * ((1 - distill) * ce + distill * temperature**2 * kl) / denominator
        agreement.append(int((z.argmax(-1) == last.argmax(-1)).sum()))
    return total, agreement


@pytest.mark.parametrize("kernel", ["trl", "torch"])
@pytest.mark.parametrize(
    "head_grad, distill, temperature, bias, softcap, spec",
    [
        ("last", 0.0, 1.0, False, None, "uniform"),
        ("last", 0.0, 1.0, True, 3.0, "last:0.5"),
        ("all", 0.5, 1.0, False, None, "uniform"),
        ("all", 0.3, 2.0, True, 3.0, "last:0.7"),  # softcap and temperature change both the KL and its gradient
        ("last", 1.0, 1.5, True, None, "linear"),  # early exits learn only from the last exit
    ],
)
def test_quality_controls_match_reference(head_grad, distill, temperature, bias, softcap, spec, kernel):
    n = 23
    hidden, weight, b, targets = make_inputs(3, n, 8, 37, bias, seed=3)
    w = exit_loss_weights(spec, [1, 2, 3])
    out = sorted_exit_loss(
        hidden,
        targets,
        HeadParameters(weight, b, final_logit_softcapping=softcap),
        weights=w,
        num_items_in_batch=40,
        options=ExitLossOptions(
            exit_loss_kernel=kernel,
            exit_vocab_chunk_size=10,
            exit_head_grad=head_grad,
            exit_distill_weight=distill,
            exit_distill_temperature=temperature,
        ),
        token_chunk_size=7,  # several token blocks, a ragged last one
        distill_chunk_size=6,
    )
    params = [*hidden, weight] + ([b] if bias else [])
    grads = torch.autograd.grad(out.loss, params)
    ref, agreement = controls_reference(hidden, targets, weight, b, w, 40, head_grad, distill, temperature, softcap)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in params)  # gradient_blocked restored the flags
    if distill > 0:
        assert [int(c) for c in out.exit_num_agree] == agreement
        assert 0 < sum(agreement) < 2 * n  # the check can fail: random exits neither all agree nor all differ
        assert len(out.exit_kl_sums) == 2 and all(kl > 0 for kl in out.exit_kl_sums)
    else:
        assert out.exit_num_agree is None and out.exit_kl_sums is None


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_head_gets_only_the_last_exits_gradient(kernel):
    hidden, weight, b, targets = make_inputs(3, 11, 8, 30, True, seed=4)
    head, controls = HeadParameters(weight, b), options(kernel, exit_head_grad="last")
    out = sorted_exit_loss(hidden, targets, head, weights=[0.25, 0.25, 0.5], options=controls)
    head_grads = torch.autograd.grad(out.loss, [weight, b])
    last_only = 0.5 * F.cross_entropy(F.linear(hidden[-1], weight, b), targets)
    for got, expected in zip(head_grads, torch.autograd.grad(last_only, [weight, b]), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_every_control_reduces_to_plain_cross_entropy_with_one_exit(kernel):
    hidden, weight, b, targets = make_inputs(1, 9, 8, 30, True, seed=5)
    w = exit_loss_weights("last:0.3", [4])
    assert w == [1.0]
    controls = options(kernel, exit_head_grad="last", exit_distill_weight=0.7)
    out = sorted_exit_loss(hidden, targets, HeadParameters(weight, b), weights=w, options=controls)
    ref = F.cross_entropy(F.linear(hidden[0], weight, b), targets)
    torch.testing.assert_close(out.loss, ref)
    params = [hidden[0], weight, b]
    for got, expected in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert out.exit_num_agree is None


def test_distillation_of_an_all_masked_batch_is_a_finite_zero():
    hidden = [torch.randn(0, 8, requires_grad=True) for _ in range(3)]
    weight = torch.randn(20, 8, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    out = sorted_exit_loss(hidden, targets, HeadParameters(weight), options=options("torch", exit_distill_weight=0.5))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(weight.grad) == 0


# Under bf16 a kernel may be at most this many times less accurate than plain bf16 code (F.linear + F.cross_entropy)
BF16_ERROR_FACTOR = 2.0


def relative_error(got, exact):
    return float((got.double() - exact).norm() / exact.norm())


def rounded_reference(hidden, targets, weight, distill, dtype):
    """`controls_reference` (uniform weights, mean over tokens) on the bf16-rounded inputs, run in `dtype`."""
    leaves = [h.detach().bfloat16().to(dtype).requires_grad_() for h in hidden]
    head = weight.detach().bfloat16().to(dtype).requires_grad_()
    weights = [1.0 / len(leaves)] * len(leaves)
    loss, _ = controls_reference(leaves, targets, head, None, weights, targets.numel(), "all", distill, 1.0, None)
    grads = torch.autograd.grad(loss, [*leaves, head])
    return loss.detach().double(), [g.double() for g in grads]


@pytest.mark.parametrize("kernel", ["trl", "torch"])
@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_bf16_autocast_loss_and_gradients_are_bounded_by_plain_bf16(kernel, distill):
    """Under bf16 autocast (Trainer's `bf16=True`) the loss and the gradients of the exits and the head are within
    `BF16_ERROR_FACTOR` times the error plain bf16 code makes against float64 (Cut Cross-Entropy's tolerance)."""
    hidden, weight, _, targets = make_inputs(3, 64, 32, 300, False, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        controls = options(kernel, exit_distill_weight=distill)
        out = sorted_exit_loss(hidden, targets, HeadParameters(weight), options=controls, token_chunk_size=20)
    grads = torch.autograd.grad(out.loss, [*hidden, weight])
    exact_loss, exact_grads = rounded_reference(hidden, targets, weight, distill, torch.float64)
    bf16_loss, bf16_grads = rounded_reference(hidden, targets, weight, distill, torch.bfloat16)
    # A scalar bf16 result is off by up to half a bf16 step (2^-8 relative) even when computed exactly
    half_step = 2.0**-9 * float(exact_loss.abs())
    assert abs(float(out.loss.detach()) - float(exact_loss)) <= BF16_ERROR_FACTOR * max(
        abs(float(bf16_loss - exact_loss)), half_step
    )
    for got, plain, exact in zip(grads, bf16_grads, exact_grads, strict=True):
        assert relative_error(got, exact) <= BF16_ERROR_FACTOR * relative_error(plain, exact)
    # The bound means something: plain bf16 gradients are far from float64
    assert relative_error(bf16_grads[-1], exact_grads[-1]) > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"exit_head_grad": "first"}, "exit_head_grad must be one of \\('all', 'last'\\), got 'first'"),
        ({"exit_distill_weight": 1.5}, "exit_distill_weight must be in \\[0, 1\\] .* got 1.5"),
        ({"exit_distill_temperature": 0.0}, "exit_distill_temperature must be > 0, got 0.0"),
        ({"exit_loss_kernel": "triton"}, "exit_loss_kernel must be one of \\('auto', 'trl', 'torch'\\), got 'triton'"),
        ({"exit_vocab_chunk_size": 2.5}, "exit_vocab_chunk_size must be a positive integer, got 2.5"),
        ({"exit_vocab_chunk_size": 0}, "exit_vocab_chunk_size must be a positive integer, got 0"),
        ({"loss_type": "focal"}, "loss_type must be one of \\('nll', 'dft'\\) .* got 'focal'"),
    ],
)
def test_invalid_options_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitLossOptions(**kwargs)
