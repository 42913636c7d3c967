"""Metric helpers of the per-exit evaluation: pure functions on tensors and strings, tested on hand-computed cases."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch

__all__ = [
    "cosine_similarity_matrix",
    "exact_match",
    "gsm8k_exact_match",
    "kl_divergence",
    "kl_divergence_matrix",
    "normalize_answer",
    "perplexity",
    "token_f1",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy in nats; ``inf`` when it overflows.

    Args:
        loss: Mean negative log-likelihood per token (nats).

    Returns:
        The perplexity.
    """
    return math.exp(loss) if loss < 700 else math.inf


def kl_divergence(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(P_ref || P)`` of two log-probability tensors.

    Args:
        reference_log_probs: ``(..., V)`` log-probabilities of the reference distribution (e.g. the last layer).
        log_probs: ``(..., V)`` log-probabilities of the compared distribution (e.g. an exit).

    Returns:
        ``(...)`` KL divergences in nats, ``>= 0`` up to rounding.
    """
    return (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1)


def kl_divergence_matrix(row_log_probs: torch.Tensor, column_log_probs: torch.Tensor) -> torch.Tensor:
    """Summed-over-tokens ``KL(P_col_j || P_row_i)`` for every pair of distributions, with one matmul.

    ``KL(Q || P) = sum_v q (log q - log p)``, so the sum over tokens is ``sum_n (-H(q_n)) - <log p, q>`` and the
    cross term of all pairs is one ``(I, N*V) @ (N*V, J)`` product.

    Args:
        row_log_probs: ``(I, N, V)`` log-probabilities of ``I`` compared distributions over ``N`` tokens.
        column_log_probs: ``(J, N, V)`` log-probabilities of ``J`` reference distributions over the same tokens.

    Returns:
        ``(I, J)`` float64 sums over the ``N`` tokens; divide by ``N`` for the mean.
    """
    num_rows, num_tokens, vocab = row_log_probs.shape
    column_probs = column_log_probs.exp()  # (J, N, V)
    negative_entropy = (column_probs * column_log_probs).sum((1, 2)).double()  # (J,)
    # float32 products: the rounding error is ~1e-6 of the summed entropy, far below the KLs of interest, and a
    # float64 copy of (E, N, V) tensors would cost more than the head itself
    cross = row_log_probs.reshape(num_rows, num_tokens * vocab) @ column_probs.reshape(-1, num_tokens * vocab).T
    return (negative_entropy[None, :] - cross.double()).clamp_min(0.0)  # (I, J)


def cosine_similarity_matrix(row_hidden: torch.Tensor, column_hidden: torch.Tensor) -> torch.Tensor:
    """Summed-over-tokens cosine similarity of every pair of hidden-state sets.

    Args:
        row_hidden: ``(I, N, H)`` hidden states of ``I`` exits at ``N`` tokens.
        column_hidden: ``(J, N, H')`` hidden states at the same tokens; ``H'`` must equal ``H``.

    Returns:
        ``(I, J)`` float64 sums over the ``N`` tokens; divide by ``N`` for the mean.
    """
    if row_hidden.shape[-1] != column_hidden.shape[-1]:
        raise ValueError(
            f"Cosine similarity needs equal hidden sizes, got {row_hidden.shape[-1]} and {column_hidden.shape[-1]}: "
            "the compared models must share an architecture width."
        )
    rows = torch.nn.functional.normalize(row_hidden.float(), dim=-1)
    columns = torch.nn.functional.normalize(column_hidden.float(), dim=-1)
    return torch.einsum("inh,jnh->ij", rows, columns).double()


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-F1 between a prediction and a reference, on normalised whitespace tokens.

    Returns:
        The harmonic mean of token precision and recall (1.0 when both are empty, 0.0 when only one is).
    """
    predicted_tokens = normalize_answer(prediction).split()
    reference_tokens = normalize_answer(reference).split()
    if not predicted_tokens or not reference_tokens:
        return float(predicted_tokens == reference_tokens)
    overlap = sum((Counter(predicted_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def gsm8k_exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction's final ``#### N`` equals the reference's (numerically), else 0.0."""
    from ..data import gsm8k_answer

    predicted, expected = gsm8k_answer(prediction), gsm8k_answer(reference)
    if predicted is None or expected is None:
        return 0.0
    try:
        return float(math.isclose(float(predicted), float(expected), rel_tol=0, abs_tol=1e-6))
    except ValueError:
        return float(predicted == expected)
