"""The exit-head contract: how a causal LM's own final norm and shared LM head turn hidden states into logits.

"Exit k" is the hidden state after k decoder layers (``hidden_states[k]`` in transformers), passed through the model's
own final norm and its one shared LM head, with the model's logit post-processing (Gemma-2/3 softcapping, Cohere
``logit_scale``, Granite ``logits_scaling``).

One contract, used by the loss wrapper, evaluation and the decoders alike: a *raw* state is what a decoder layer
outputs; [`ExitHead.normed_from_raw`] applies the final norm (and projection); [`ExitHead.logits_from_normed`] applies
the head and post-processing. transformers' ``last_hidden_state`` is already normed, so [`ExitHead.exit_state`] reads
exit ``num_layers`` from it and never norms twice; a layer-wise decoder holds the last layer's raw output and norms it.

Where the parts are found in a model (backbone, decoder layers, final norm) is [`soft_peft.model_layout`].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .model_layout import find_backbone, find_final_norm, find_output_projection, num_decoder_layers, unwrap_model

__all__ = ["ExitHead", "find_exit_head"]


@dataclass
class ExitHead:
    """The modules and constants that turn exit hidden states into logits: raw -> normed -> logits.

    Attributes:
        num_layers: Decoder depth; exit ``num_layers`` is the model's ordinary output.
        final_norm: The model's final norm, or ``None`` for models without one (OPT with post-layer norm).
        output_projection: A projection applied after the norm (OPT's ``project_out``), or ``None``.
        lm_head: The shared output embedding (``model.get_output_embeddings()``).
        final_logit_softcapping: Gemma-2/3 softcap ``c`` (logits become ``c * tanh(logits / c)``), or ``None``.
        logit_scale: Multiplier applied to the logits before softcapping (Cohere ``logit_scale``, Granite
            ``1 / logits_scaling``); ``1.0`` for most models.
    """

    num_layers: int
    final_norm: nn.Module | None
    output_projection: nn.Module | None
    lm_head: nn.Module
    final_logit_softcapping: float | None = None
    logit_scale: float = 1.0

    def normed_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Final norm (and output projection) of raw hidden states ``(..., H)`` output by any decoder layer."""
        if self.final_norm is not None:
            raw = self.final_norm(raw)
        if self.output_projection is not None:
            raw = self.output_projection(raw)
        return raw

    def logits_from_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``(..., V)`` of normed hidden states ``(..., H)``, post-processing included."""
        return self.post_process(self.lm_head(normed))

    def logits_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``(..., V)`` of raw hidden states ``(..., H)`` output by any decoder layer."""
        return self.logits_from_normed(self.normed_from_raw(raw))

    def post_process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the model's logit scale and softcap to raw head outputs ``(..., V)`` (or any slice of them)."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def exit_state(
        self, outputs, layer: int, select: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Normed state of exit ``layer`` from a backbone's outputs (see [`~soft_peft.model_layout.backbone_outputs`]).

        Exit ``num_layers`` is ``last_hidden_state``, which the backbone already normed; any other exit is
        ``hidden_states[layer]`` through [`normed_from_raw`].

        Args:
            outputs: Backbone outputs with ``hidden_states`` and ``last_hidden_state`` (each ``(B, T, H)``).
            layer: The exit, in ``1..num_layers``.
            select: Applied to the ``(B, T, H)`` state before the norm, to norm only the positions needed
                (``lambda h: h[:, :-1][mask]``, say); ``None`` keeps every position.

        Returns:
            The normed states, ``(B, T, H)`` or whatever ``select`` returns.
        """
        final = layer == self.num_layers
        state = outputs.last_hidden_state if final else outputs.hidden_states[layer]
        if select is not None:
            state = select(state)
        return state if final else self.normed_from_raw(state)


def _logit_post_processing(text_config) -> tuple[float | None, float]:
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)  # Cohere multiplies
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:  # Granite divides
        scale = 1.0 / text_config.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)


def find_exit_head(model: nn.Module, final_norm: nn.Module | None = None) -> ExitHead:
    """Locate the final norm, output projection and shared LM head of a causal LM, generically.

    The head is ``get_output_embeddings()``; the norm is [`~soft_peft.model_layout.find_final_norm`]'s. PEFT, DDP
    and DeepSpeed wrappers are unwrapped. Look-ups are cheap, so callers redo them on each forward: FSDP and PEFT may
    replace modules after a first look.

    Args:
        model: A transformers causal LM, possibly wrapped.
        final_norm: Pass the norm module explicitly where [`~soft_peft.model_layout.find_final_norm`] cannot tell it.

    Returns:
        The model's [`ExitHead`].

    Raises:
        ValueError: for an encoder-decoder model, and when the head or norm cannot be found, naming the model class
            and the ``final_norm`` argument.
    """
    base = unwrap_model(model)
    config = base.config
    if getattr(config, "is_encoder_decoder", False):  # its decoder reads an encoder: no prefix is a sub-model alone
        raise ValueError(
            f"{type(base).__name__} is an encoder-decoder model (config.is_encoder_decoder=True); SoFT needs a "
            "decoder-only causal LM (`AutoModelForCausalLM`, e.g. Llama, Qwen, SmolLM2), whose every prefix of "
            "layers is a language model of its own."
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    backbone = find_backbone(base)
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if lm_head is None or getattr(lm_head, "weight", None) is None:
        raise ValueError(
            f"{type(base).__name__} has no output embedding (`get_output_embeddings()` returned {lm_head!r}), so SoFT "
            "has no shared LM head to apply at each exit. Use a causal LM class (`AutoModelForCausalLM`)."
        )
    projection = None
    if final_norm is None:
        final_norm = find_final_norm(base)
        projection = find_output_projection(backbone)
    softcap, scale = _logit_post_processing(text_config)
    return ExitHead(
        num_layers=num_decoder_layers(base),
        final_norm=final_norm,
        output_projection=projection,
        lm_head=lm_head,
        final_logit_softcapping=softcap,
        logit_scale=scale,
    )
