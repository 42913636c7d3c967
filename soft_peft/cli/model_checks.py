"""What the inference commands check before loading a model: its depth, context length and trained exits, read from
its config alone (seconds, where loading the weights takes minutes on large models).

Kept free of torch imports, like the argument parsers that use it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

__all__ = ["ModelFacts", "positive_int", "read_model_facts", "untrained_exit_warning", "warn"]

_CONFIG_KEY = "soft_exit_layers"  # soft_peft.exits.CONFIG_KEY, without importing torch


@dataclass
class ModelFacts:
    """What a checkpoint's config says about it.

    Attributes:
        name: The model's folder or Hub name, as given.
        num_layers: Decoder depth.
        max_positions: Context length (``max_position_embeddings``), or ``None`` when the config has none.
        recorded_exits: The ``soft_exit_layers`` it was trained with, or ``None`` (not trained with SoFT).
        config: The config itself.
    """

    name: str
    num_layers: int
    max_positions: int | None
    recorded_exits: list[int] | None
    config: object = None


def read_model_facts(name_or_path: str) -> ModelFacts:
    """Read a model's [`ModelFacts`] from its ``config.json`` (a PEFT adapter folder: its base model's config).

    Raises:
        ValueError: when no config can be read or it has no usable depth, naming the model.
    """
    from transformers import AutoConfig

    source, adapter_exits = name_or_path, None
    adapter_config = os.path.join(name_or_path, "adapter_config.json")
    if not os.path.isfile(os.path.join(name_or_path, "config.json")) and os.path.isfile(adapter_config):
        from ..checkpoints import read_adapter_exit_layers

        with open(adapter_config, encoding="utf-8") as handle:
            source = json.load(handle).get("base_model_name_or_path") or name_or_path
        # An adapter's exits are recorded beside it (`soft_peft_config.json`), not in its base model's config
        adapter_exits = read_adapter_exit_layers(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--model_name_or_path {name_or_path}: cannot read its config.json ({reason})") from None
    text_config = config.get_text_config()
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{name_or_path}: its config has no usable `num_hidden_layers` ({num_layers!r}).")
    if adapter_exits is not None:  # the base model's config, as `load_causal_lm` will give it the adapter's exits
        setattr(config, _CONFIG_KEY, adapter_exits)
    recorded = getattr(config, _CONFIG_KEY, None)
    max_positions = getattr(text_config, "max_position_embeddings", None)
    return ModelFacts(
        name=name_or_path,
        num_layers=num_layers,
        max_positions=max_positions if isinstance(max_positions, int) else None,
        recorded_exits=None if recorded is None else [int(k) for k in recorded],
        config=config,
    )


def untrained_exit_warning(facts: ModelFacts, exits: list[int], flag: str) -> str | None:
    """The warning for decoding with exits below the last layer that the checkpoint did not train, else ``None``.

    As ``extract_submodel`` warns: an exit that is not one of the recorded ``soft_exit_layers``, or any early exit of
    a model without them (``soft-peft eval`` refuses such a model unless ``--exit_layers`` is given).

    Args:
        facts: The model's facts.
        exits: The exits the command will use.
        flag: The flag that chose them, for the message.
    """
    early = [k for k in exits if k < facts.num_layers]
    if not early:
        return None
    if facts.recorded_exits is None:
        return (
            f"{facts.name} records no trained exits (no `{_CONFIG_KEY}` in its config.json: not trained with "
            f"SoFTTrainer), so {flag} {','.join(map(str, early))} decodes with an untrained sub-model; expect poor "
            "output and few accepted drafts."
        )
    untrained = [k for k in early if k not in facts.recorded_exits]
    if untrained:
        return (
            f"{flag} {','.join(map(str, untrained))} is not one of the exits {facts.name} was trained with "
            f"({facts.recorded_exits}); its sub-model may be poor. Pick one of those."
        )
    return None


def warn(prog: str, message: str | None) -> None:
    """Print ``prog: warning: message`` on stderr (nothing for ``None``)."""
    if message:
        print(f"{prog}: warning: {message}", file=sys.stderr)


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
