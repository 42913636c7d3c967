"""`sorted_exit_loss` against a plain reference: full logits + F.cross_entropy per exit, weighted mean."""

import pytest
import torch
import torch.nn.functional as F

from soft_peft.loss import exit_loss_weights, sorted_exit_loss


def reference(hidden, targets, weight, bias, weights, denominator, softcap=None, scale=1.0):
    total = 0.0
    for w, h in zip(weights, hidden, strict=True):
        logits = F.linear(h, weight, bias) * scale  # (N, V)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        total = total + w * F.cross_entropy(logits, targets, reduction="sum") / denominator
    return total


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
        weight,
        b,
        weights=w,
        final_logit_softcapping=softcap,
        logit_scale=scale,
        vocab_chunk_size=chunk,
        token_chunk_size=max(1, n // 3),  # several token blocks
        kernel=kernel,
        with_last_entropy=True,
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
    torch.testing.assert_close(out.last_entropy, entropy, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_num_items_in_batch_replaces_the_local_token_count(kernel):
    hidden, weight, _, targets = make_inputs(2, 6, 8, 20, False)
    out = sorted_exit_loss(hidden, targets, weight, num_items_in_batch=24, kernel=kernel)
    ref = reference(hidden, targets, weight, None, [0.5, 0.5], 24)
    torch.testing.assert_close(out.loss, ref)
    # exit_losses stay per-batch means whatever the normaliser
    torch.testing.assert_close(out.exit_losses[0] * 6 / 24 * 0.5 + out.exit_losses[1] * 6 / 24 * 0.5, ref)


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_all_masked_batch_gives_finite_differentiable_zero(kernel):
    hidden = [torch.randn(0, 8, requires_grad=True) for _ in range(3)]
    weight = torch.randn(20, 8, requires_grad=True)
    out = sorted_exit_loss(hidden, torch.zeros(0, dtype=torch.long), weight, kernel=kernel)
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.count_nonzero(weight.grad) == 0
    assert all(loss.item() == 0.0 for loss in out.exit_losses)


@pytest.mark.parametrize("kernel", ["trl", "torch"])
def test_dft_weights_tokens_by_their_probability(kernel):
    hidden, weight, _, targets = make_inputs(1, 7, 8, 20, False)
    out = sorted_exit_loss(hidden, targets, weight, token_weighting="dft", kernel=kernel)
    logp = F.log_softmax(F.linear(hidden[0], weight), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(out.loss, (-logp * logp.detach().exp()).sum() / 7)


@pytest.mark.parametrize(
    "spec, expected",
    [("uniform", [0.25] * 4), ("linear", [0.1, 0.2, 0.3, 0.4]), ("1,1,1,5", [0.125, 0.125, 0.125, 0.625])],
)
def test_exit_loss_weights(spec, expected):
    assert exit_loss_weights(spec, [1, 2, 3, 4]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "spec, message",
    [([1.0], "one weight per exit"), ([1, -1], "negative"), ([0, 0], "at least one weight"), ("fancy", "'uniform'")],
)
def test_invalid_weights(spec, message):
    with pytest.raises(ValueError, match=message):
        exit_loss_weights(spec, [1, 2])


def test_bf16_autocast_stays_close_to_fp32():
    """Under bf16 autocast (TRL's default), the torch kernel's error is bounded like TRL's own."""
    hidden, weight, _, targets = make_inputs(2, 64, 32, 300, False)
    exact = sorted_exit_loss(hidden, targets, weight, kernel="torch").loss
    results = {}
    for kernel in ("trl", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[kernel] = sorted_exit_loss(hidden, targets, weight, kernel=kernel).loss
    trl_error = (results["trl"] - exact).abs().item()
    assert (results["torch"] - exact).abs().item() <= 2 * trl_error + 1e-3
