"""Where a saved SoFT model keeps its trained exits, and the loader the command line uses.

A full model records them as ``soft_exit_layers`` in ``config.json``. A PEFT adapter folder has no ``config.json``
(writing one would make transformers take the folder for a full model with an embedded adapter), so the exits go to
``soft_peft_config.json`` beside ``adapter_config.json``; [`load_causal_lm`] puts them back into the loaded model's
config, where [`~soft_peft.exits.recorded_exit_layers`] finds them.

Every save of `SoFTTrainer` (checkpoints and the final model) also writes ``soft_peft_run.json``: what the run was
configured with (base model, its config, exits and their weights, the exit schedule and layer dropout, and the run's
length when the schedule depends on it), which a resumed run must match.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from .exits import CONFIG_KEY, record_exit_layers

if TYPE_CHECKING:
    from .settings import SoFTSettings

__all__ = [
    "ADAPTER_EXITS_FILE",
    "RUN_RECORD_FILE",
    "SCHEDULE_SETTINGS",
    "load_causal_lm",
    "read_adapter_exit_layers",
    "read_run_record",
    "run_schedule",
    "save_adapter_exit_layers",
    "save_run_record",
    "saves_an_adapter",
]

ADAPTER_EXITS_FILE = "soft_peft_config.json"
RUN_RECORD_FILE = "soft_peft_run.json"
# The SoFT settings that change the loss step by step: a resumed run must keep them to continue the same run
SCHEDULE_SETTINGS = (
    "exit_ramp_steps",
    "exit_ramp_order",
    "exit_rotation",
    "exit_start_steps",
    "exit_anneal_fraction",
    "exit_anneal_floor",
    "layer_dropout",
    "layer_dropout_scale",
    "layer_dropout_ramp_steps",
)


def saves_an_adapter(model: nn.Module) -> bool:
    """Whether ``model.save_pretrained`` writes a PEFT adapter (a `PeftModel`, or a transformers model with an adapter
    loaded through its PEFT integration) rather than a full checkpoint with ``config.json``."""
    from peft import PeftModel

    return isinstance(model, PeftModel) or bool(getattr(model, "_hf_peft_config_loaded", False))


def save_adapter_exit_layers(folder: str | os.PathLike, exit_layers: Sequence[int]) -> None:
    """Write ``{"soft_exit_layers": [...]}`` to ``folder/soft_peft_config.json`` (beside a saved adapter).

    Args:
        folder: The adapter folder (created if missing).
        exit_layers: The trained exits.
    """
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ADAPTER_EXITS_FILE), "w", encoding="utf-8") as handle:
        json.dump({CONFIG_KEY: [int(k) for k in exit_layers]}, handle, indent=2)
        handle.write("\n")


def read_adapter_exit_layers(folder: str | os.PathLike) -> list[int] | None:
    """The exits recorded beside an adapter by [`save_adapter_exit_layers`], or ``None`` when there are none.

    Args:
        folder: A local folder (an adapter or any other); a Hub id or missing folder gives ``None``.
    """
    path = os.path.join(folder, ADAPTER_EXITS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        layers = json.load(handle).get(CONFIG_KEY)
    return None if layers is None else [int(k) for k in layers]


def run_schedule(settings: SoFTSettings, max_steps: int, num_train_epochs: float) -> dict:
    """A run's [`SCHEDULE_SETTINGS`] by name, with its length (``max_steps`` and ``num_train_epochs``) when an anneal
    is on: the anneal starts at a fraction of the run's total steps, which these set (the ramp, late start, rotation
    and layer dropout count steps from the start, so a longer run does not move them).

    Args:
        settings: The run's SoFT settings (a [`~soft_peft.settings.SoFTSettings`] or `SoFTConfig`).
        max_steps, num_train_epochs: The run's `TrainingArguments` of those names.
    """
    schedule = {name: getattr(settings, name) for name in SCHEDULE_SETTINGS}
    if settings.exit_schedule().anneals:
        schedule.update(max_steps=int(max_steps), num_train_epochs=float(num_train_epochs))
    return schedule


def save_run_record(
    folder: str | os.PathLike,
    base_model: str,
    base_model_config: dict,
    exit_layers: Sequence[int],
    exit_loss_weights: Sequence[float],
    num_tokens: int | None = None,
    schedule: dict | None = None,
) -> None:
    """Write ``folder/soft_peft_run.json``: what a run was configured with, and how far it got, for
    [`read_run_record`] on resume.

    Args:
        folder: A checkpoint or output folder (created if missing).
        base_model: The model the run started from (its ``name_or_path``).
        base_model_config: That model's config as a dict (``config.to_dict()``): the shape a resumed model must have.
        exit_layers: The configured exits, ascending.
        exit_loss_weights: Their normalised weights, one per exit.
        num_tokens: The tokens trained on so far, as TRL's logged ``num_tokens`` counts them (``None``: not known).
        schedule: The run's exit schedule, layer dropout and (with an anneal) length, as [`run_schedule`] gives them
            (``None``: not recorded).
    """
    record = {
        "base_model": base_model,
        "exit_layers": [int(k) for k in exit_layers],
        "exit_loss_weights": [float(w) for w in exit_loss_weights],
        "base_model_config": base_model_config,
    }
    if num_tokens is not None:
        record["num_tokens"] = int(num_tokens)
    if schedule is not None:
        record["schedule"] = dict(schedule)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, RUN_RECORD_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, default=str)
        handle.write("\n")


def read_run_record(folder: str | os.PathLike) -> dict | None:
    """The record [`save_run_record`] wrote in ``folder``, or ``None`` when there is none (a checkpoint not saved by
    `SoFTTrainer`).

    Returns:
        ``{"base_model", "base_model_config", "exit_layers", "exit_loss_weights"}``, ``"num_tokens"`` when the
        trainer counted them, and ``"schedule"`` ([`run_schedule`]'s) when the record was written by a soft-peft that
        records it.
    """
    path = os.path.join(folder, RUN_RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_causal_lm(name_or_path: str, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` (full models and PEFT adapter folders alike), with the SoFT exits
    recorded beside an adapter put into the model's config.

    Args:
        name_or_path: A model or adapter folder, or a Hub id.
        **kwargs: Passed to ``from_pretrained`` (``dtype``, ...).

    Returns:
        The model; ``recorded_exit_layers(model)`` gives its trained exits, or ``None`` for a model not trained
        with SoFT.

    Raises:
        NonFiniteWeightsError: (a ``ValueError``) for a model with a NaN or infinite weight, naming it.
    """
    from transformers import AutoModelForCausalLM

    from .run_guards import check_finite_weights

    # Never transformers' interactive `[y/N]` remote-code prompt: soft-peft does not run a model's own code
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **{"trust_remote_code": False, **kwargs})
    check_finite_weights(model, name_or_path)  # it would decode or score NaN without a word
    adapter_exits = read_adapter_exit_layers(name_or_path)
    if adapter_exits is not None:  # the adapter's exits, not those of a SoFT base model it was trained on
        record_exit_layers(model, adapter_exits)
    return model
