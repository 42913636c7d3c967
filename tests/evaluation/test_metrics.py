"""Metric helpers on hand-computable cases, and the per-exit evaluation against a naive full-logits reference."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_model, tiny_tokenizer

from soft_peft.evaluation.examples import tokenize_examples
from soft_peft.evaluation.metrics import (
    cosine_similarity_matrix,
    exact_match,
    gsm8k_exact_match,
    kl_divergence,
    kl_divergence_matrix,
    perplexity,
    token_f1,
)
from soft_peft.evaluation.per_exit import evaluate_exits


def test_kl_of_identical_distributions_is_zero():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 5, 11), dim=-1)  # (E, N, V)
    assert torch.allclose(kl_divergence(log_probs, log_probs), torch.zeros(3, 5), atol=1e-6)
    matrix = kl_divergence_matrix(log_probs, log_probs)
    assert torch.allclose(matrix.diagonal(), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    off_diagonal = matrix[~torch.eye(3, dtype=torch.bool)]
    assert (off_diagonal > 1e-2).all()  # random distributions differ


def test_kl_matrix_matches_elementwise_definition():
    torch.manual_seed(1)
    rows = torch.log_softmax(torch.randn(2, 4, 7), dim=-1)
    columns = torch.log_softmax(torch.randn(3, 4, 7), dim=-1)
    matrix = kl_divergence_matrix(rows, columns)
    for i in range(2):
        for j in range(3):
            expected = (columns[j].exp() * (columns[j] - rows[i])).sum()  # sum over tokens of KL(col || row)
            assert matrix[i, j].item() == pytest.approx(expected.item(), abs=1e-5)


def test_kl_of_hand_computed_pair():
    # KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3)
    reference = torch.tensor([[0.5, 0.5]]).log()
    other = torch.tensor([[0.25, 0.75]]).log()
    assert kl_divergence(reference, other).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


def test_cosine_of_identical_states_is_one_and_orthogonal_zero():
    torch.manual_seed(2)
    hidden = torch.randn(2, 6, 8)
    matrix = cosine_similarity_matrix(hidden, hidden) / 6  # mean over 6 tokens
    assert torch.allclose(matrix.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-6)
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.0, 3.0]]])
    assert cosine_similarity_matrix(a, b).item() == pytest.approx(0.0)
    assert cosine_similarity_matrix(a, -a).item() == pytest.approx(-1.0)


def test_perplexity_is_exp_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e4) == math.inf


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat", "cat sat", 1.0),  # articles are dropped
        ("a b c d", "a b", 0.5),  # article 'a' dropped: [b c d] vs [b], P = 1/3, R = 1, F1 = 2PR / (P + R) = 1/2
        ("red red blue", "red blue green", 2 / 3),  # overlap 2 (red once): P = R = 2/3
        ("Paris!", "paris", 1.0),
        ("x y", "z", 0.0),
        ("", "", 1.0),
    ],
)
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_exact_match_and_gsm8k_answer():
    assert exact_match("The Answer.", "answer") == 1.0
    assert exact_match("answer 2", "answer") == 0.0
    assert gsm8k_exact_match("so 3+4=7\n#### 7", "4+3 = 7\n#### 7") == 1.0
    assert gsm8k_exact_match("#### 1,000", "#### 1000") == 1.0
    assert gsm8k_exact_match("#### 8", "#### 7") == 0.0
    assert gsm8k_exact_match("no final answer", "#### 7") == 0.0


def _naive_exit_log_probs(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Full ``(T, V)`` log-probs of one exit the obvious way: norm + head on every position."""
    out = model(ids, output_hidden_states=True)
    if layer == model.config.num_hidden_layers:
        return out.logits[0].log_softmax(-1)
    return model.lm_head(model.model.norm(out.hidden_states[layer]))[0].log_softmax(-1)


def test_per_exit_metrics_match_naive_reference():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    rows = [{"prompt": "abc ", "completion": "hello"}, {"prompt": "x", "completion": "yz w"}]
    examples = tokenize_examples(Dataset.from_list(rows), tokenizer, "prompt_completion")
    # Small chunks and batches on purpose: results must not depend on them
    result = evaluate_exits([model], [[1, 3]], examples, 0, batch_size=2, token_chunk_size=3, progress=False)
    assert result.exits == [[1, 3, 4]]  # the last layer is always added
    nll, correct, kl, count = {1: 0.0, 3: 0.0, 4: 0.0}, {1: 0, 3: 0, 4: 0}, {1: 0.0, 3: 0.0}, 0
    agree = {1: 0, 3: 0, 4: 0}
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.prompt_ids + example.completion_ids])
            scored = slice(len(example.prompt_ids) - 1, ids.shape[1] - 1)
            targets = ids[0, 1:][scored]
            last = _naive_exit_log_probs(model, ids, 4)[scored]
            for layer in (1, 3, 4):
                log_probs = _naive_exit_log_probs(model, ids, layer)[scored]
                nll[layer] -= log_probs.gather(-1, targets[:, None]).sum().item()
                correct[layer] += (log_probs.argmax(-1) == targets).sum().item()
                agree[layer] += (log_probs.argmax(-1) == last.argmax(-1)).sum().item()
                if layer != 4:
                    kl[layer] += kl_divergence(last, log_probs).sum().item()
            count += targets.numel()
    assert result.num_tokens == count == 11
    for layer in (1, 3, 4):
        metrics = result.metrics[0][layer]
        assert metrics["loss"] == pytest.approx(nll[layer] / count, rel=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(nll[layer] / count), rel=1e-5)
        assert metrics["token_accuracy"] == pytest.approx(correct[layer] / count)
        assert metrics["agreement_with_last"] == pytest.approx(agree[layer] / count)
    assert result.metrics[0][1]["kl_to_last"] == pytest.approx(kl[1] / count, rel=1e-4)
    assert result.metrics[0][4]["kl_to_last"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics[0][4]["cosine_to_last"] == pytest.approx(1.0, abs=1e-5)
    assert result.metrics[0][1]["cosine_to_last"] < 0.999
    assert result.metrics[0][4]["agreement_with_last"] == 1.0 and result.metrics[0][1]["agreement_with_last"] < 1.0
