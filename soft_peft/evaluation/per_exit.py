"""Per-exit teacher-forced metrics and similarity to the last layer, for one model or two compared models.

One forward per batch and model with ``output_hidden_states``; only completion positions reach the head, in chunks of
``token_chunk_size`` tokens, so at most ``(num_exits, chunk, V)`` log-probabilities per model exist at once and never a
``[batch, seq, vocab]`` tensor per exit.

Definitions (all averaged over every scored completion token of the dataset):

- ``loss``: mean token cross-entropy (nats); ``perplexity = exp(loss)``;
- ``token_accuracy``: share of tokens whose argmax is the reference token;
- ``kl_to_last``: ``KL(P_last || P_exit)``, the last layer's distribution as the reference;
- ``agreement_with_last``: share of tokens whose argmax equals the last layer's argmax (teacher-forced): about the
  per-token acceptance rate greedy self-speculative decoding gets when this exit drafts, so it picks ``draft_exit``;
- ``cosine_to_last``: cosine similarity of the exit's *normed* hidden state (the head's input) and the last layer's.

Similarity matrices cover every pair of exits: entry ``[i][j]`` of ``kl[(a, b)]`` is ``KL(P_{b, exit j} ||
P_{a, exit i})`` for models ``a`` and ``b`` (``a == b``: within one model); the paper's cross-model figure is
``kl[(a, b)][i][-1]`` (model a's exit i against model b's last layer) and ``kl[(b, a)]`` for the other direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..exit_head import find_exit_head
from ..model_layout import backbone_outputs, num_decoder_layers
from .examples import EvalExample
from .metrics import cosine_similarity_matrix, kl_divergence_matrix, perplexity

__all__ = ["ExitEvaluation", "evaluate_exits", "make_batches"]


@dataclass
class ExitEvaluation:
    """Result of [`evaluate_exits`].

    Attributes:
        exits: Per model, the evaluated exits (ascending, always ending with the last layer).
        num_tokens: Scored completion tokens.
        metrics: Per model, ``{layer: {"loss", "perplexity", "token_accuracy", "kl_to_last", "agreement_with_last",
            "cosine_to_last"}}``;
            with two models also ``"kl_to_other_last"`` and ``"cosine_to_other_last"`` (against the other model's
            last layer).
        kl: ``{(a, b): I x J matrix}``, mean ``KL(P_{b,j} || P_{a,i})`` over tokens (see the module docstring).
        cosine: ``{(a, b): I x J matrix}``, mean cosine similarity of normed hidden states.
    """

    exits: list[list[int]]
    num_tokens: int
    metrics: list[dict[int, dict[str, float]]]
    kl: dict[tuple[int, int], list[list[float]]] = field(default_factory=dict)
    cosine: dict[tuple[int, int], list[list[float]]] = field(default_factory=dict)


def make_batches(examples: Sequence[EvalExample], batch_size: int, pad_token_id: int) -> list[dict]:
    """Right-padded batches of ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)`` and ``completion_mask``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        length = max(len(e.prompt_ids) + len(e.completion_ids) for e in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        completion_mask = torch.zeros((len(chunk), length), dtype=torch.bool)
        for row, example in enumerate(chunk):
            ids = example.prompt_ids + example.completion_ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            completion_mask[row, len(example.prompt_ids) : len(ids)] = True
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask})
    return batches


def _normed_exit_states(model: nn.Module, batch: dict, exits: Sequence[int]) -> torch.Tensor:
    """``(E, N, H)`` normed hidden states of each exit at the positions that predict completion tokens."""
    head = find_exit_head(model)
    device = head.lm_head.weight.device
    outputs = backbone_outputs(
        model, input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    predicting = batch["completion_mask"][:, 1:].to(device)  # (B, T-1): position t predicts token t+1
    states = [head.exit_state(outputs, layer, lambda state: state[:, :-1][predicting]) for layer in exits]
    return torch.stack(states)  # (E, N, H)


def _exit_log_probs(model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """``(E, n, V)`` float32 log-probabilities of ``(E, n, H)`` normed states, with the model's logit processing."""
    return torch.log_softmax(find_exit_head(model).logits_from_normed(normed).float(), dim=-1)


def _per_exit_metrics(layers, nll, correct, agree, kl, cosine, denominator) -> list[dict[int, dict[str, float]]]:
    """Per model, ``{layer: metrics}`` from the summed statistics; "last" is each model's last layer."""
    num_models = len(layers)
    metrics = []
    for index, model_layers in enumerate(layers):
        other = 1 - index if num_models == 2 else None
        per_layer = {}
        for row, layer in enumerate(model_layers):
            loss = float(nll[index][row] / denominator)
            values = {
                "loss": loss,
                "perplexity": perplexity(loss),
                "token_accuracy": float(correct[index][row] / denominator),
                "kl_to_last": kl[(index, index)][row][-1],
                "agreement_with_last": float(agree[index][row] / denominator),
                "cosine_to_last": cosine[(index, index)][row][-1],
            }
            if other is not None:
                values["kl_to_other_last"] = kl[(index, other)][row][-1]
                values["cosine_to_other_last"] = cosine[(index, other)][row][-1]
            per_layer[layer] = values
        metrics.append(per_layer)
    return metrics


def evaluate_exits(
    models: Sequence[nn.Module],
    exits: Sequence[Sequence[int]],
    examples: Sequence[EvalExample],
    pad_token_id: int,
    batch_size: int = 4,
    token_chunk_size: int = 64,
    progress: bool = True,
) -> ExitEvaluation:
    """Teacher-forced per-exit metrics and exit-by-exit similarity matrices.

    Args:
        models: One model, or two models sharing a tokenizer and vocabulary (model 0 is compared to model 1).
        exits: Per model, the exits to evaluate; the last layer is added when missing (it is the reference).
        examples: Tokenized examples (see [`tokenize_examples`]).
        pad_token_id: Token used for right padding (masked out).
        batch_size: Examples per forward.
        token_chunk_size: Completion tokens per head pass (memory: ``E * chunk * V`` floats per model).
        progress: Show a tqdm bar.

    Returns:
        An [`ExitEvaluation`].

    Raises:
        ValueError: for more than two models, or models whose vocabularies differ.
    """
    if not 1 <= len(models) <= 2 or len(exits) != len(models):
        raise ValueError("evaluate_exits takes one or two models, with one list of exits per model.")
    layers = []
    for model, requested in zip(models, exits, strict=True):
        depth = num_decoder_layers(model)
        layers.append(sorted(set(requested) | {depth}))
    vocab_sizes = {find_exit_head(m).lm_head.weight.shape[0] for m in models}
    if len(vocab_sizes) != 1:
        raise ValueError(f"Compared models must share a vocabulary; their LM heads have sizes {sorted(vocab_sizes)}.")
    for model in models:
        model.eval()
    num_models = len(models)
    pairs = [(a, b) for a in range(num_models) for b in range(num_models)]
    nll = [torch.zeros(len(ls), dtype=torch.float64) for ls in layers]
    correct = [torch.zeros(len(ls), dtype=torch.float64) for ls in layers]
    agree = [torch.zeros(len(ls), dtype=torch.float64) for ls in layers]
    kl_sums = {p: torch.zeros(len(layers[p[0]]), len(layers[p[1]]), dtype=torch.float64) for p in pairs}
    cos_sums = {p: torch.zeros(len(layers[p[0]]), len(layers[p[1]]), dtype=torch.float64) for p in pairs}
    num_tokens = 0
    batches = make_batches(list(examples), batch_size, pad_token_id)
    with torch.inference_mode():
        for batch in tqdm(batches, desc="per-exit evaluation", disable=not progress):
            targets_all = batch["input_ids"][:, 1:][batch["completion_mask"][:, 1:]]  # (N,)
            normed = [_normed_exit_states(m, batch, ls) for m, ls in zip(models, layers, strict=True)]  # (E, N, H)
            for start in range(0, targets_all.numel(), token_chunk_size):
                stop = start + token_chunk_size
                log_probs = [_exit_log_probs(m, h[:, start:stop]) for m, h in zip(models, normed, strict=True)]
                for index, lp in enumerate(log_probs):
                    targets = targets_all[start:stop].to(lp.device)  # (n,)
                    picked = lp.gather(-1, targets[None, :, None].expand(lp.shape[0], -1, 1)).squeeze(-1)  # (E, n)
                    nll[index] -= picked.double().sum(-1).cpu()
                    top = lp.argmax(-1)  # (E, n)
                    correct[index] += (top == targets[None]).double().sum(-1).cpu()
                    agree[index] += (top == top[-1:]).double().sum(-1).cpu()
                for a, b in pairs:
                    kl_sums[(a, b)] += kl_divergence_matrix(log_probs[a], log_probs[b].to(log_probs[a].device)).cpu()
                    cos_sums[(a, b)] += cosine_similarity_matrix(
                        normed[a][:, start:stop], normed[b][:, start:stop].to(normed[a].device)
                    ).cpu()
            num_tokens += targets_all.numel()
    denominator = max(num_tokens, 1)
    kl = {p: (s / denominator).tolist() for p, s in kl_sums.items()}
    cosine = {p: (s / denominator).tolist() for p, s in cos_sums.items()}
    metrics = _per_exit_metrics(layers, nll, correct, agree, kl, cosine, denominator)
    return ExitEvaluation(exits=layers, num_tokens=num_tokens, metrics=metrics, kl=kl, cosine=cosine)
