"""Inference with a SoFT model: sub-models, self-speculative decoding and confidence-based early exit.

All three share one set of weights. The decoders run the model's own modules layer range by layer range over one
``DynamicCache`` (see [`DecoderStack`]), so no layer is computed twice. Both decoders return a [`DecodeOutput`]:
``.sequences`` as ``generate`` returns them, and ``.stats`` ([`SpeculativeStats`] or [`DynamicStats`]). Their
settings can be checked against a model's depth before it loads ([`check_speculative_settings`],
[`dynamic_exit_thresholds`], [`check_dynamic_settings`]).
"""

from .decoding import DecodeOutput, DecodeStats
from .dynamic import (
    DynamicStats,
    check_dynamic_settings,
    default_dynamic_exits,
    dynamic_exit_thresholds,
    dynamic_generate,
)
from .speculative import (
    SpeculativeStats,
    check_speculative_settings,
    choose_draft_length,
    self_speculative_generate,
)
from .stack import DecoderStack
from .submodel import extract_submodel
from .tokens import exit_confidence
from .vocab import SubsetHead, frequent_token_ids

__all__ = [
    "DecodeOutput",
    "DecodeStats",
    "DecoderStack",
    "DynamicStats",
    "SpeculativeStats",
    "SubsetHead",
    "check_dynamic_settings",
    "check_speculative_settings",
    "choose_draft_length",
    "default_dynamic_exits",
    "dynamic_exit_thresholds",
    "dynamic_generate",
    "exit_confidence",
    "extract_submodel",
    "frequent_token_ids",
    "self_speculative_generate",
]
