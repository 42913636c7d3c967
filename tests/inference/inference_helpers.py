"""Prompts and a slow no-cache reference decoder shared by the inference tests."""

from __future__ import annotations

import torch
from tiny_models import VOCAB

from soft_peft.inference import exit_confidence
from soft_peft.inference.stack import DecoderStack


def prompts(batch: int, length: int, seed: int = 0, pads: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts ``(batch, length)`` without special tokens; row ``i`` gets ``pads[i]`` left pad tokens (id 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, count in enumerate(pads):
        input_ids[row, :count] = 0
        attention_mask[row, :count] = 0
    return input_ids, attention_mask


def reference_dynamic(model, input_ids, attention_mask, exits, threshold, max_new_tokens):
    """Per-token early exit recomputed from scratch every step (no cache): the batch exits where all rows pass."""
    stack = DecoderStack(model)
    num_layers = stack.num_layers
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    sequences, depths = input_ids, []
    with torch.no_grad():
        for step in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            outputs = model(sequences, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
            depth, logits = num_layers, outputs.logits[:, -1]
            for layer in exits if step > 0 else []:  # the first new token always uses the full depth
                exit_logits = stack.logits(outputs.hidden_states[layer][:, -1])
                if bool((exit_confidence(exit_logits) > threshold).all()):
                    depth, logits = layer, exit_logits
                    break
            depths.append(depth)
            sequences = torch.cat([sequences, logits.argmax(-1)[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return sequences, depths
