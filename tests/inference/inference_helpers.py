"""Prompts, a slow no-cache reference decoder and exact sampling laws shared by the inference tests."""

from __future__ import annotations

import torch
from tiny_models import VOCAB, tiny_model

from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.tokens import exit_confidence


def prompts(batch: int, length: int, seed: int = 0, pads: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts ``(batch, length)`` without special tokens; row ``i`` gets ``pads[i]`` left pad tokens (id 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, count in enumerate(pads):
        input_ids[row, :count] = 0
        attention_mask[row, :count] = 0
    return input_ids, attention_mask


def reference_dynamic(
    model,
    input_ids,
    attention_mask,
    exits,
    threshold,
    max_new_tokens,
    check_vocab=None,
    exit_on_subset=False,
    confidence="max_prob",
):
    """Per-token early exit recomputed from scratch every step (no cache): the batch exits where all rows pass.

    ``threshold`` is one float, or one per exit; ``confidence`` is passed to ``exit_confidence``.
    With ``check_vocab``, a row passes only when the confidence on those logits alone passes too; with
    ``exit_on_subset`` that confidence alone decides, and an early exit emits the top token among ``check_vocab``.
    """
    stack = DecoderStack(model)
    num_layers = stack.num_layers
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    thresholds = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold] * len(exits)
    sequences, depths = input_ids, []
    with torch.no_grad():
        for step in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            outputs = model(sequences, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
            depth, logits = num_layers, outputs.logits[:, -1]
            for layer, limit in zip(exits, thresholds, strict=True) if step > 0 else []:  # first token: full depth
                exit_logits = stack.head.logits_from_raw(outputs.hidden_states[layer][:, -1])
                passed = exit_confidence(exit_logits, confidence) > limit
                if check_vocab is not None:
                    on_subset = exit_confidence(exit_logits[:, check_vocab], confidence) > limit
                    passed = on_subset if exit_on_subset else passed & on_subset
                if bool(passed.all()):
                    depth, logits = layer, exit_logits
                    if exit_on_subset:  # only the subset's tokens can be emitted
                        logits = torch.full_like(exit_logits, -torch.inf)
                        logits[:, check_vocab] = exit_logits[:, check_vocab]
                    break
            depths.append(depth)
            sequences = torch.cat([sequences, logits.argmax(-1)[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return sequences, depths


def mixed_exit_threshold(model, input_ids, attention_mask, exits, max_new_tokens):
    """A threshold at which the reference exits some tokens early and not others (tiny random models are unsure).

    Returns:
        ``(threshold, reference sequences, reference depths)``.
    """
    stack = DecoderStack(model)
    with torch.no_grad():
        hidden_states = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        values = torch.cat(
            [exit_confidence(stack.head.logits_from_raw(hidden_states[k][:, -4:]).flatten(0, 1)) for k in exits]
        )
    for quantile in (0.5, 0.25, 0.1, 0.05, 0.02):
        threshold = float(values.quantile(quantile))
        expected, depths = reference_dynamic(model, input_ids, attention_mask, exits, threshold, max_new_tokens)
        if len(set(depths)) > 1:
            return threshold, expected, depths
    raise AssertionError("no threshold mixes early and full-depth exits for this model")


# The sampling tests' setting: a tiny vocabulary, so the exact law of two tokens has only 25 cells to test
LAW_VOCAB = 5
LAW_PROMPT = torch.tensor([[3, 4, 1, 3]])


def law_model_and_law():
    """A tiny Llama over ``LAW_VOCAB`` tokens and the exact law of its 2nd and 3rd tokens after ``LAW_PROMPT``."""
    model = tiny_model("llama", vocab_size=LAW_VOCAB)
    return model, exact_two_token_law(model, LAW_PROMPT, LAW_VOCAB)


def exact_two_token_law(model, prompt, vocab):
    """P(t2, t3) of the full model after ``prompt``, summed over the first new token t1: ``(V * V,)``."""
    with torch.no_grad():
        first = model(prompt).logits[0, -1].softmax(-1)  # (V,)
        grid = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # (V*V, 2): (t1, t2)
        sequences = torch.cat([prompt.repeat(vocab * vocab, 1), grid], dim=1)
        probs = model(sequences).logits[:, -2:].softmax(-1)  # (V*V, 2, V): P(t2 | t1), P(t3 | t1, t2)
    t1, t2 = grid.unbind(-1)
    joint = first[t1] * probs[:, 0].gather(-1, t2[:, None]).squeeze(-1)  # P(t1, t2)
    law = joint[:, None] * probs[:, 1]  # (V*V, V): P(t1, t2, t3)
    return torch.zeros(vocab, vocab).index_put_((t2,), law, accumulate=True).flatten()  # P(t2, t3)


def chi_square_p(sequences, exact, vocab):
    """Chi-square p-value of the last two tokens of ``sequences`` against the law ``exact`` ``(V * V,)``."""
    from scipy.stats import chisquare

    pairs = sequences[:, -2] * vocab + sequences[:, -1]
    observed = torch.bincount(pairs, minlength=vocab * vocab).double()
    expected = exact.double() / exact.double().sum() * len(pairs)
    return chisquare(observed.numpy(), expected.numpy()).pvalue
