"""Which exits a model has: exit settings (``exit_layers``, ``exits``), the paper's defaults, and the exits recorded
in a checkpoint.

What an exit *computes* (the final norm and shared head applied to a layer's hidden state) is
[`soft_peft.exit_head`]; where the model keeps those parts is [`soft_peft.model_layout`].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

from torch import nn

from .model_layout import unwrap_model

# One import path, the top level: `from soft_peft import recorded_exit_layers`
__all__ = [
    "CONFIG_KEY",
    "default_exit_layers",
    "exit_layers_as_written",
    "parse_exit_layers",
    "parse_exit_spec",
    "record_exit_layers",
]

# The paper's 8 sub-models of a 40-layer LLaMA-2 13B are layers 12, 16, ..., 40: exit i sits at (3 + i) / 10 of depth.
_DEFAULT_NUM_EXITS = 8
_DEFAULT_FIRST_FRACTION = 0.3
_DEFAULT_STEP_FRACTION = 0.1

CONFIG_KEY = "soft_exit_layers"


def default_exit_layers(num_layers: int) -> list[int]:
    """The paper's 8 evenly spaced sub-models, scaled to ``num_layers``.

    Exit ``i`` (``i = 0..7``) is layer ``round(num_layers * (3 + i) / 10)``, rounding halves up, clamped to at least 1,
    with duplicates removed. For 40 layers this is exactly ``[12, 16, ..., 40]``; for SmolLM2's 30 it is
    ``[9, 12, ..., 30]``. Shallow models get fewer than 8 exits.

    Args:
        num_layers: Decoder depth of the model.

    Returns:
        Sorted list of exit layers, always ending at ``num_layers``.
    """
    layers = []
    for i in range(_DEFAULT_NUM_EXITS):
        fraction = _DEFAULT_FIRST_FRACTION + i * _DEFAULT_STEP_FRACTION
        layer = max(1, math.floor(num_layers * fraction + 0.5))
        if layer not in layers:
            layers.append(layer)
    return layers


class _SpecError(ValueError):
    """A syntax error in an exit setting; the public parsers add the advice that fits what they know."""


def _invalid(message: str, num_layers: int, setting: str) -> ValueError:
    default = default_exit_layers(num_layers)
    gaps = {b - a for a, b in pairwise(default)}
    # The slice that spells the default when it is evenly spaced (most depths), else every layer from its first exit
    step, meaning = (gaps.pop(), "the same exits") if len(gaps) == 1 else (1, f"every layer from {default[0]}")
    return ValueError(
        f"{message} The model has {num_layers} decoder layers, so exits must be distinct integers in 1..{num_layers}, "
        f"e.g. {setting}=[{','.join(map(str, default))}] or the slice string "
        f"'{default[0]}:{num_layers + 1}:{step}' ({meaning})."
    )


def _parse_syntax(spec: str | Sequence[int], setting: str) -> list[int] | slice:
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise _SpecError(f"Cannot parse {setting}={spec!r} as 'start:stop:step'.")
            try:
                start, stop, step = (int(p) if p.strip() else None for p in (parts + [""])[:3])
            except ValueError:
                raise _SpecError(f"{setting}={spec!r} has a non-integer slice bound.") from None
            start = 1 if start is None else start
            step = 1 if step is None else step
            if step < 1:
                raise _SpecError(f"{setting}={spec!r} needs a positive step.")
            if start < 1:
                raise _SpecError(f"{setting}={spec!r} starts at layer {start}; layers are counted from 1.")
            if stop is None:  # up to the last layer: only the model's depth can resolve it
                return slice(start, None, step)
            layers = list(range(start, stop, step))
        else:
            try:
                layers = [int(p) for p in text.replace(" ", ",").split(",") if p]
            except ValueError:
                raise _SpecError(f"{setting}={spec!r} is not a list of integers.") from None
    else:
        layers = list(spec)
    for layer in layers:
        # bool is an int subclass; a float such as 12.0 is rejected rather than truncated
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise _SpecError(f"{setting} contains {layer!r}, which is not an integer.")
    if not layers:
        raise _SpecError(f"{setting}={spec!r} selects no layer.")
    if len(set(layers)) != len(layers):
        raise _SpecError(f"{setting}={layers} has duplicates.")
    bad = [k for k in layers if k < 1]
    if bad:
        raise _SpecError(f"{setting} has {bad}, but layers are counted from 1 (exit k follows the k-th layer).")
    return layers  # as written: explicit exit weights follow this order


def parse_exit_spec(spec: str | Sequence[int] | None) -> list[int] | slice | None:
    """Check the syntax of an ``exit_layers`` setting without knowing the model's depth.

    Everything that can be wrong without a model is checked here (integers, duplicates, layers below 1, slice
    syntax); [`parse_exit_layers`] then checks the layers against the model's depth.

    Args:
        spec: As for [`parse_exit_layers`].

    Returns:
        ``None`` for ``None`` (the paper's default exits), a ``slice`` with ``stop=None`` for an open slice such as
        ``"9::3"`` (its end is the model's depth), otherwise the exits sorted ascending.

    Raises:
        ValueError: for non-integers, duplicates, layers below 1, an empty selection or a malformed slice.
    """
    if spec is None:
        return None
    try:
        parsed = _parse_syntax(spec, "exit_layers")
    except _SpecError as error:
        raise ValueError(
            f"{error} Exits are distinct layer numbers from 1 to the model's depth, e.g. exit_layers='9,12,15' or "
            "the slice '9::3' (every 3rd layer from 9 to the last)."
        ) from None
    return parsed if isinstance(parsed, slice) else sorted(parsed)


def parse_exit_layers(spec: str | Sequence[int] | None, num_layers: int, setting: str = "exit_layers") -> list[int]:
    """Resolve an exit setting against a model's depth: the trained ``exit_layers``, or the ``exits`` an inference or
    evaluation call uses (same syntax).

    Args:
        spec: ``None`` (the paper's default, see [`default_exit_layers`]), a list of ints, a comma-separated string
            ``"12,16,20"``, or a ``"start:stop:step"`` slice string over layer numbers (``"12:41:4"`` gives
            12, 16, ..., 40; as in Python, ``stop`` is excluded and may be omitted to mean ``num_layers + 1``).
        num_layers: Decoder depth of the model.
        setting: The setting's name, for messages (``"exits"`` for the exits a decoder or evaluation uses).

    Returns:
        The exits, sorted ascending.

    Raises:
        ValueError: for non-integers, duplicates, or layers outside ``1..num_layers``, naming the depth and a valid
            example.
    """
    return sorted(exit_layers_as_written(spec, num_layers, setting))


def exit_layers_as_written(
    spec: str | Sequence[int] | None, num_layers: int, setting: str = "exit_layers"
) -> list[int]:
    """As [`parse_exit_layers`], but in the order the user wrote them (the order explicit exit weights follow).

    Args:
        spec, num_layers, setting: As for [`parse_exit_layers`].

    Returns:
        The exits of a list or comma-separated string in their given order; a slice or the default, ascending.

    Raises:
        ValueError: as [`parse_exit_layers`].
    """
    if spec is None:
        return default_exit_layers(num_layers)
    try:
        parsed = _parse_syntax(spec, setting)
    except _SpecError as error:
        raise _invalid(str(error), num_layers, setting) from None
    if isinstance(parsed, slice):
        parsed = list(range(parsed.start, num_layers + 1, parsed.step))
        if not parsed:
            raise _invalid(f"{setting}={spec!r} selects no layer.", num_layers, setting)
    bad = [k for k in parsed if not 1 <= k <= num_layers]
    if bad:
        raise _invalid(f"{setting} has {bad} outside 1..{num_layers}.", num_layers, setting)
    return parsed


def record_exit_layers(model: nn.Module, exit_layers: Sequence[int]) -> None:
    """Record the trained exits as ``soft_exit_layers`` in the model config (``save_pretrained`` writes it)."""
    setattr(unwrap_model(model).config, CONFIG_KEY, [int(k) for k in exit_layers])


def recorded_exit_layers(model: nn.Module) -> list[int] | None:
    """The ``soft_exit_layers`` recorded in a model's config, or ``None`` for a model not trained with SoFT."""
    layers = getattr(unwrap_model(model).config, CONFIG_KEY, None)
    return None if layers is None else [int(k) for k in layers]
