"""Inference with a SoFT model: sub-models, self-speculative decoding and confidence-based early exit.

All three share one set of weights. The decoders run the model's own modules layer range by layer range over one
``DynamicCache`` (`soft_peft.inference.stack.DecoderStack`), so no layer is computed twice. Both decoders return a
`DecodeOutput` (`soft_peft.inference.decoding`): ``.sequences`` as ``generate`` returns them, and ``.stats``
(`SpeculativeStats` or `DynamicStats`).

The three entry points are public at the top level (`from soft_peft import self_speculative_generate,
dynamic_generate, extract_submodel`); every other name is imported from the module that defines it, its one import
path: settings checked against a model's depth before it loads (`soft_peft.inference.speculative`
`check_speculative_settings`, `soft_peft.inference.dynamic` `dynamic_exit_thresholds`, `check_dynamic_settings`),
the drafts' frequent-token subset (`soft_peft.inference.vocab`), the exit confidences (`soft_peft.inference.tokens`).
"""

__all__: list[str] = []
