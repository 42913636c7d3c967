"""Run a causal LM's decoder one range of layers at a time, over one shared ``DynamicCache``.

Self-speculative and dynamic decoding need what ``model.forward`` cannot give: run layers ``1..k`` on some positions
now and layers ``k+1..L`` on them later, so different layers of the cache hold different lengths.
[`DecoderStack`] keeps the few architecture-specific bits (how a backbone embeds tokens, builds position embeddings
and calls a layer) in one place. Supported: the Llama family (Llama, Mistral, Qwen2, Qwen3, and any backbone with
``embed_tokens``, ``rotary_emb``, ``layers`` and ``norm``) and GPT-2 (``wte``, ``wpe``, ``h``, ``ln_f``). Masks come
from transformers' own ``create_causal_mask``, sized against the cache layer about to run, as ``model.forward`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from ..exit_head import find_exit_head
from ..model_layout import find_backbone, get_decoder_layers, num_decoder_layers, unwrap_model

__all__ = ["DecoderStack", "LaggingPositions", "StepInputs", "check_generation_inputs"]

_LLAMA_FAMILY = ("embed_tokens", "rotary_emb", "norm")
_GPT2_FAMILY = ("wte", "wpe", "ln_f")


@dataclass
class StepInputs:
    """Per-position inputs of a chunk of new tokens, shared by every layer that runs on it.

    Attributes:
        position_ids: ``(B, q)`` positions, counted from each row's first non-pad token (as ``generate`` does).
        position_embeddings: Rotary ``(cos, sin)`` for the Llama family, ``None`` for GPT-2.
        attention_mask: ``(B, past + q)`` padding mask of every position so far, ``None`` without padding.
    """

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    attention_mask: torch.Tensor | None


def check_generation_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, pad_token_id: int | None
) -> torch.Tensor | None:
    """Validate ``generate``-style inputs; return the padding mask to use (``None`` when nothing is padded).

    Args:
        input_ids: ``(B, T)`` prompt token ids, left-padded when ``B > 1``.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding, or ``None``.
        max_new_tokens: Number of tokens to generate, at least 1.
        pad_token_id: The pad id, used to detect padding when ``attention_mask`` is missing.

    Returns:
        The ``(B, T)`` long mask, or ``None`` when every position is a real token (like ``generate``, which drops an
        all-ones mask).

    Raises:
        ValueError: for a non-2D ``input_ids``, ``max_new_tokens < 1``, a mask of another shape, right padding, or a
            batch containing pad tokens without a mask.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            "`input_ids` must be a non-empty (batch, length) LongTensor; add a batch dimension with [None]."
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
    if attention_mask is None:
        if input_ids.shape[0] > 1 and pad_token_id is not None and bool((input_ids == pad_token_id).any()):
            raise ValueError(
                f"The batch contains the pad token ({pad_token_id}) but no `attention_mask` was given, so padding "
                "cannot be told from text. Pass the tokenizer's `attention_mask` (with `padding_side='left'`)."
            )
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has {tuple(input_ids.shape)}."
        )
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "`attention_mask` ends with padding: decoding needs left padding. Tokenize with `padding_side='left'`."
        )
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("A row of `attention_mask` is all padding; every prompt needs at least one token.")
    return None if bool(attention_mask.all()) else attention_mask


class DecoderStack:
    """A causal LM seen as embedding -> layers ``1..L`` -> final norm -> shared head, runnable by layer range.

    Args:
        model: A transformers causal LM of a supported family, possibly PEFT-wrapped.

    Raises:
        ValueError: for an unsupported backbone (naming it and the supported families) or sliding-window layers.
    """

    def __init__(self, model: nn.Module):
        self.model = unwrap_model(model)
        self.config = self.model.config.get_text_config(decoder=True)
        self.backbone = find_backbone(self.model)
        if all(isinstance(getattr(self.backbone, name, None), nn.Module) for name in _LLAMA_FAMILY):
            self.family = "llama"
        elif all(isinstance(getattr(self.backbone, name, None), nn.Module) for name in _GPT2_FAMILY):
            self.family = "gpt2"
        else:
            raise ValueError(
                f"Layer-wise decoding does not support {type(self.model).__name__} (backbone "
                f"{type(self.backbone).__name__}): it supports the Llama family (Llama, Mistral, Qwen2, Qwen3: "
                f"{', '.join(_LLAMA_FAMILY)} on the backbone) and GPT-2 ({', '.join(_GPT2_FAMILY)}). Use "
                "`extract_submodel` plus `generate` for other architectures."
            )
        sliding = [i + 1 for i, layer in enumerate(self.new_cache().layers) if getattr(layer, "is_sliding", False)]
        if sliding:
            raise ValueError(
                f"{type(self.model).__name__} has sliding-window attention at layers {sliding}; layer-wise decoding "
                "supports full attention only. Set `config.sliding_window = None` if the window exceeds your texts."
            )
        self.layers = get_decoder_layers(self.model)
        self.num_layers = num_decoder_layers(self.model)
        self.head = find_exit_head(self.model)

    def new_cache(self) -> DynamicCache:
        """An empty cache with one layer per decoder layer."""
        return DynamicCache(config=self.model.config)

    def step_inputs(self, full_mask: torch.Tensor | None, start: int, length: int, batch: int) -> StepInputs:
        """Positions and rotary embeddings of sequence positions ``start..start+length-1``.

        Args:
            full_mask: ``(B, >= start + length)`` padding mask of the whole sequence, or ``None`` without padding.
            start: First absolute position of the chunk.
            length: Number of positions ``q``.
            batch: Batch size ``B``.
        """
        device = self.model.device
        if full_mask is None:
            position_ids = torch.arange(start, start + length, device=device).unsqueeze(0).expand(batch, -1)
            mask = None
        else:
            mask = full_mask[:, : start + length]
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, start:]
        embeddings = None
        if self.family == "llama":
            probe = torch.empty(0, dtype=self.model.dtype, device=device)
            embeddings = self.backbone.rotary_emb(probe, position_ids)
        return StepInputs(position_ids=position_ids, position_embeddings=embeddings, attention_mask=mask)

    def embed(self, input_ids: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Input embeddings ``(B, q, H)`` of token ids ``(B, q)``, position embeddings added for GPT-2."""
        if self.family == "llama":
            return self.backbone.embed_tokens(input_ids)
        hidden = self.backbone.wte(input_ids) + self.backbone.wpe(inputs.position_ids)
        return self.backbone.drop(hidden)

    def run_layers(
        self, hidden: torch.Tensor, first: int, last: int, inputs: StepInputs, cache: DynamicCache
    ) -> torch.Tensor:
        """Run decoder layers ``first..last`` (1-based, inclusive) on ``hidden`` ``(B, q, H)``, extending the cache.

        Every layer in the range must hold the same number of cached positions (the chunk's ``start``).

        Returns:
            The hidden states ``(B, q, H)`` after layer ``last``.
        """
        if first > last:
            return hidden
        mask = self._causal_mask(hidden, first, inputs, cache)
        for layer in self.layers[first - 1 : last]:
            if self.family == "llama":
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=inputs.position_embeddings,
                    position_ids=inputs.position_ids,
                    cache=cache,
                    use_cache=True,
                )
            else:
                hidden = layer(hidden, cache, mask, use_cache=True)
        return hidden

    def _causal_mask(self, hidden: torch.Tensor, first: int, inputs: StepInputs, cache: DynamicCache):
        # Sized against the range's first layer: its cache holds the positions the new queries attend to
        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=inputs.attention_mask,
            cache=cache,
            position_ids=inputs.position_ids,
            layer_idx=first - 1,
        )

    def fill_kv(self, hidden: torch.Tensor, first: int, last: int, inputs: StepInputs, cache: DynamicCache) -> None:
        """CALM-style: cache keys/values of layers ``first..last`` computed from one state ``hidden`` ``(B, q, H)``.

        Each skipped layer sees the exited state as its input (no layer output is propagated); only its attention
        block runs, so the cost is about a third of a layer on Llama-family models.
        """
        if first > last:
            return
        mask = self._causal_mask(hidden, first, inputs, cache)
        for layer in self.layers[first - 1 : last]:
            if self.family == "llama":
                layer.self_attn(
                    hidden_states=layer.input_layernorm(hidden),
                    attention_mask=mask,
                    position_embeddings=inputs.position_embeddings,
                    position_ids=inputs.position_ids,
                    cache=cache,
                    use_cache=True,
                )
            else:
                layer.attn(layer.ln_1(hidden), cache=cache, attention_mask=mask, use_cache=True)

    def cache_length(self, cache: DynamicCache, layer: int) -> int:
        """Number of positions cached at decoder layer ``layer`` (1-based)."""
        return cache.get_seq_length(layer - 1)

    def crop(self, cache: DynamicCache, first: int, last: int, length: int) -> None:
        """Cut layers ``first..last`` (1-based) of the cache back to ``length`` positions."""
        for index in range(first - 1, last):
            extra = cache.get_seq_length(index) - length
            if extra > 0:
                cache.layers[index].crop(-extra)


@dataclass
class LaggingPositions:
    """Consecutive positions whose states stopped at different layers, waiting for a deeper token to carry them up.

    A position that left early (an early exit, or a draft taken from an early exit) still needs its upper layers'
    keys and values before a later token may attend to them there. The next token that goes deeper runs those layers
    on the lagging positions in the same multi-position pass (EE-LLM's recomputation). Depths never increase along
    positions, since a deeper token always carries every earlier position with it.

    Attributes:
        states: ``(B, 1, H)`` latest hidden state of each lagging position, oldest first.
        depths: The layer each state is after.
    """

    states: list[torch.Tensor] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)

    def append(self, state: torch.Tensor, depth: int) -> None:
        """Add the newest position, its state after layer ``depth``."""
        self.states.append(state)
        self.depths.append(depth)

    def clear(self) -> None:
        """Forget every position (they were all carried to the top)."""
        self.states.clear()
        self.depths.clear()

    def advance(
        self,
        state: torch.Tensor,
        layer: int,
        stop: int,
        position: int,
        run: Callable[[torch.Tensor, int, int, int], torch.Tensor],
    ) -> torch.Tensor:
        """Run a new position's ``state`` (after ``layer``) up to layer ``stop``, carrying the lagging ones along.

        Args:
            state: ``(B, 1, H)`` state of the new position, the one right after the lagging ones.
            layer: The layer ``state`` is after.
            stop: The layer to reach.
            position: The new position's absolute index.
            run: ``run(hidden, first, last, start)`` runs layers ``first..last`` on ``hidden`` ``(B, q, H)`` whose
                first position is ``start``.

        Returns:
            The new position's state after layer ``stop``; lagging positions passed on the way are updated.
        """
        while layer < stop:
            # Positions at the new token's depth join the chunk; earlier, deeper ones join on the way up
            first = next((i for i, depth in enumerate(self.depths) if depth <= layer), len(self.depths))
            segment_stop = min(stop, self.depths[first - 1]) if first > 0 else stop
            chunk = torch.cat(self.states[first:] + [state], dim=1)  # (B, joined + 1, H)
            out = run(chunk, layer + 1, segment_stop, position - (len(self.depths) - first))
            for offset, index in enumerate(range(first, len(self.depths))):
                self.states[index] = out[:, offset : offset + 1]
                self.depths[index] = segment_stop
            state, layer = out[:, -1:], segment_stop
        return state

    def advance_all(
        self, stop: int, position: int, run: Callable[[torch.Tensor, int, int, int], torch.Tensor]
    ) -> torch.Tensor:
        """Carry every lagging position up to layer ``stop`` and hand them over, emptying ``self``.

        Args:
            stop: The layer to reach.
            position: The newest lagging position's absolute index.
            run: As for [`advance`].

        Returns:
            ``(B, n, H)`` the states of all ``n`` positions after layer ``stop``, oldest first.
        """
        newest, depth = self.states.pop(), self.depths.pop()
        newest = self.advance(newest, depth, stop, position, run)
        states = [*self.states, newest]
        self.states, self.depths = [], []
        return torch.cat(states, dim=1)
