"""Inference with a SoFT model: sub-models, self-speculative decoding and confidence-based early exit.

All three share one set of weights. The decoders run the model's own modules layer range by layer range over one
``DynamicCache`` (see [`DecoderStack`]), so no layer is computed twice.
"""

from .dynamic import DynamicOutput, default_dynamic_exits, dynamic_generate
from .speculative import SpeculativeOutput, SpeculativeStats, choose_draft_length, self_speculative_generate
from .stack import DecoderStack
from .submodel import extract_submodel
from .tokens import exit_confidence
from .vocab import SubsetHead, frequent_token_ids

__all__ = [
    "DecoderStack",
    "DynamicOutput",
    "SpeculativeOutput",
    "SpeculativeStats",
    "SubsetHead",
    "choose_draft_length",
    "default_dynamic_exits",
    "dynamic_generate",
    "exit_confidence",
    "extract_submodel",
    "frequent_token_ids",
    "self_speculative_generate",
]
