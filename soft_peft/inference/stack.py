"""Run a causal LM's decoder one range of layers at a time, over one shared ``DynamicCache``.

Self-speculative and dynamic decoding need what ``model.forward`` cannot give: run layers ``1..k`` on some positions
now and layers ``k+1..L`` on them later, so different layers of the cache hold different lengths.
[`DecoderStack`] keeps the few architecture-specific bits (how a backbone embeds tokens, builds position embeddings
and calls a layer) in one place. Supported: the Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3, and any
backbone with ``embed_tokens``, ``rotary_emb``, ``layers`` and ``norm``) and GPT-2 (``wte``, ``wpe``, ``h``,
``ln_f``), with full or sliding-window attention per layer (``config.layer_types``). Each layer gets the mask of its
own attention type from transformers' own mask functions (``create_causal_mask``,
``create_sliding_window_causal_mask``), sized against the cache layer about to run, and the rotary embeddings of its
type where they differ (Gemma 3's local and global bases), as ``model.forward`` does.

The cache keeps every position at every layer, sliding ones included: transformers' sliding cache layer drops keys
that left the window, so after a rejected draft is cropped the keys that slid out would be missing. The window is
applied by the mask instead, so attention sees exactly the keys ``generate`` sees; the cost is a sliding layer's cache
growing with the text like a full one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING

from ..exit_head import find_exit_head
from ..model_layout import find_backbone, get_decoder_layers, num_decoder_layers, unwrap_model

__all__ = ["DecoderStack", "LaggingPositions", "StepInputs", "check_generation_inputs"]

_LLAMA_FAMILY = ("embed_tokens", "rotary_emb", "norm")
_GPT2_FAMILY = ("wte", "wpe", "ln_f")
_ATTENTION_TYPES = ("full_attention", "sliding_attention")


@dataclass
class StepInputs:
    """Per-position inputs of a chunk of new tokens, shared by every layer that runs on it.

    Attributes:
        position_ids: ``(B, q)`` positions, counted from each row's first non-pad token (as ``generate`` does).
        position_embeddings: Rotary ``(cos, sin)`` of each attention type for the Llama family (the same pair for
            every type unless the rotary module takes a ``layer_type``, as Gemma 3's does), ``None`` for GPT-2.
        attention_mask: ``(B, past + q)`` padding mask of every position so far, ``None`` without padding.
    """

    position_ids: torch.Tensor
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
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
        ValueError: for an unsupported backbone (naming it and the supported families), layers of another attention
            type than full or sliding-window (chunked, linear, shared KV...), or bidirectional attention.
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
                f"{type(self.backbone).__name__}): it supports the Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma: "
                f"{', '.join(_LLAMA_FAMILY)} on the backbone) and GPT-2 ({', '.join(_GPT2_FAMILY)}). Use "
                "`extract_submodel` plus `generate` for other architectures."
            )
        self.layer_types = self._attention_types()
        self._typed_rotary = (
            self.family == "llama" and "layer_type" in inspect.signature(self.backbone.rotary_emb.forward).parameters
        )
        self.layers = get_decoder_layers(self.model)
        self.num_layers = num_decoder_layers(self.model)
        self.head = find_exit_head(self.model)

    def _attention_types(self) -> list[str]:
        """Each decoder layer's attention type, as transformers' own cache reads it from the config."""
        name = type(self.model).__name__
        if getattr(self.config, "use_bidirectional_attention", False) or not getattr(self.config, "is_causal", True):
            raise ValueError(
                f"{name} uses bidirectional attention; layer-wise decoding supports causal models only. Use "
                "`extract_submodel` plus `generate` instead."
            )
        types = get_layer_types_and_kwargs(self.config)[0]
        other = {
            kind: [i + 1 for i, t in enumerate(types) if t == kind] for kind in types if kind not in _ATTENTION_TYPES
        }
        if other:
            found = "; ".join(f"{kind} at layers {layers}" for kind, layers in other.items())
            raise ValueError(
                f"{name} has layers of an unsupported attention type ({found}); layer-wise decoding supports "
                f"{' and '.join(_ATTENTION_TYPES)} layers only. Use `extract_submodel` plus `generate` instead."
            )
        return types

    def new_cache(self) -> DynamicCache:
        """An empty cache with one full-length layer per decoder layer (see the module doc for sliding layers)."""
        cache = DynamicCache()  # no config: a config would make sliding layers windowed, hence not croppable
        cache.layers.extend(DynamicLayer() for _ in self.layer_types)
        return cache

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
            rotary = self.backbone.rotary_emb
            if self._typed_rotary:  # one base per attention type (Gemma 3: local 10k, global 1M)
                embeddings = {kind: rotary(probe, position_ids, kind) for kind in set(self.layer_types)}
            else:
                shared = rotary(probe, position_ids)
                embeddings = dict.fromkeys(self.layer_types, shared)
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
        masks = self._masks(hidden, first, last, inputs, cache)
        for layer, kind in zip(self.layers[first - 1 : last], self.layer_types[first - 1 : last], strict=True):
            if self.family == "llama":
                hidden = layer(
                    hidden,
                    attention_mask=masks[kind],
                    position_embeddings=inputs.position_embeddings[kind],
                    position_ids=inputs.position_ids,
                    cache=cache,
                    use_cache=True,
                )
            else:
                hidden = layer(hidden, cache, masks[kind], use_cache=True)
        return hidden

    def _masks(self, hidden: torch.Tensor, first: int, last: int, inputs: StepInputs, cache: DynamicCache) -> dict:
        """The attention mask of each attention type among layers ``first..last``, by transformers' own functions."""
        # Sized against the range's first layer: every layer of the range caches the same positions, all of them
        return {
            kind: LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=inputs.attention_mask,
                cache=cache,
                position_ids=inputs.position_ids,
                layer_idx=first - 1,
            )
            for kind in set(self.layer_types[first - 1 : last])
        }

    def fill_kv(self, hidden: torch.Tensor, first: int, last: int, inputs: StepInputs, cache: DynamicCache) -> None:
        """CALM-style: cache keys/values of layers ``first..last`` computed from one state ``hidden`` ``(B, q, H)``.

        Each skipped layer sees the exited state as its input (no layer output is propagated); only its attention
        block runs, so the cost is about a third of a layer on Llama-family models.
        """
        if first > last:
            return
        masks = self._masks(hidden, first, last, inputs, cache)
        for layer, kind in zip(self.layers[first - 1 : last], self.layer_types[first - 1 : last], strict=True):
            if self.family == "llama":
                layer.self_attn(
                    hidden_states=layer.input_layernorm(hidden),
                    attention_mask=masks[kind],
                    position_embeddings=inputs.position_embeddings[kind],
                    position_ids=inputs.position_ids,
                    cache=cache,
                    use_cache=True,
                )
            else:
                layer.attn(layer.ln_1(hidden), cache=cache, attention_mask=masks[kind], use_cache=True)

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
