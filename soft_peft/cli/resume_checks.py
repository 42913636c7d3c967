"""Checks that a resumed run continues the run its checkpoint came from, before any weight loads.

A checkpoint saved by `SoFTTrainer` carries `soft_peft_run.json` (see [`~soft_peft.checkpoints.save_run_record`]): the
base model, its config, the exits and their weights, the exit schedule and layer dropout, and (with an anneal, which
starts at a fraction of the run's total steps) the run's length. Resuming onto a model of another shape would fail
minutes later with a size-mismatch traceback, so it is refused at once; resuming with any other of these settings would
train on silently, so it is refused unless the user opts in (`--allow_resume_changes`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..checkpoints import RUN_RECORD_FILE, read_run_record
from .preflight import UsageError

__all__ = ["check_resume_matches"]

_NOT_SHAPE = ("soft_exit_layers", "quantization_config", "_name_or_path")


def _normalized(config_class: type[PretrainedConfig], config: PretrainedConfig | dict) -> PretrainedConfig:
    # Of one class (a recorded dict has none; a remote-code class is not in AutoConfig), without the settings that
    # change no shape but would change how the model is built (quantization)
    values = config if isinstance(config, dict) else config.to_dict()
    return config_class.from_dict({key: value for key, value in values.items() if key not in _NOT_SHAPE})


@contextlib.contextmanager
def _without_zero3():
    """Hide the run's DeepSpeed ZeRO-3 config from transformers for a moment: under `accelerate launch` with ZeRO-3
    the training arguments register it, and `from_config` would then build a partitioned model (whose weight
    initialisation fails on the meta device) instead of a shape probe."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _tensor_shapes(config: PretrainedConfig, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    # On the meta device: the model's parameter shapes without allocating or loading anything
    with _without_zero3(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _shape_difference(trained: PretrainedConfig | dict, given: PretrainedConfig, remote_code: bool) -> str | None:
    """What differs between the two configs' models, in words; ``None`` when every tensor has the same shape."""
    trained_type = trained["model_type"] if isinstance(trained, dict) else trained.model_type
    if trained_type != given.model_type:
        return f"a {trained_type} model in the checkpoint, a {given.model_type} model in --model_name_or_path"
    trained, given = _normalized(type(given), trained), _normalized(type(given), given)
    trained_shapes, given_shapes = _tensor_shapes(trained, remote_code), _tensor_shapes(given, remote_code)
    if trained_shapes == given_shapes:
        return None
    trained_values, given_values = trained.to_dict(), given.to_dict()
    fields = [
        f"{key} {trained_values[key]} in the checkpoint, {given_values.get(key)} in the model"
        for key in sorted(trained_values)
        if isinstance(trained_values[key], int)
        and not isinstance(trained_values[key], bool)
        and not key.endswith("_token_id")
        and trained_values[key] != given_values.get(key)
    ]
    mismatched = [name for name, shape in trained_shapes.items() if given_shapes.get(name, shape) != shape]
    if mismatched:
        name = mismatched[0]
        example = f"{name} is {list(trained_shapes[name])} in the checkpoint, {list(given_shapes[name])} in the model"
    else:
        only = sorted(set(trained_shapes) ^ set(given_shapes))[0]
        side = "checkpoint" if only in trained_shapes else "model"
        example = f"{only} exists only in the {side}"
    return "; ".join([*fields[:3], example])


def _print_once(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # every rank runs the checks; one prints
        print(message, file=sys.stderr, flush=True)


def _same_model(a: str, b: str) -> bool:
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def _weights_text(layers: Sequence[int], weights: Sequence[float]) -> str:
    return "{" + ", ".join(f"{k}: {w:.6g}" for k, w in zip(layers, weights, strict=True)) + "}"


def _value_text(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _schedule_changes(checkpoint: str, recorded: Mapping | None, schedule: Mapping | None) -> list[str]:
    """The schedule settings (and run length) this run changes, as ``--name old in the checkpoint, new now``."""
    if schedule is None:
        return []
    if recorded is None:  # written before the record kept them: nothing to compare, said once
        _print_once(
            f"[soft-peft] {checkpoint}/{RUN_RECORD_FILE} does not record the exit schedule, layer dropout or run "
            "length (saved by an older soft-peft): they cannot be checked against this run's."
        )
        return []
    # `max_steps > 0` overrides the epochs (as in `TrainingArguments`): then only `max_steps` sets the length
    epochs_ignored = recorded.get("max_steps", 0) > 0 or schedule.get("max_steps", 0) > 0
    return [
        f"--{name} {_value_text(value)} in the checkpoint, {_value_text(schedule[name])} now"
        for name, value in recorded.items()
        # A key missing on either side is not recorded: a length without an anneal on that side is not compared
        if name in schedule and schedule[name] != value and not (name == "num_train_epochs" and epochs_ignored)
    ]


def check_resume_matches(
    checkpoint: str,
    model_name_or_path: str,
    exit_layers: Sequence[int],
    exit_loss_weights: Sequence[float],
    allow_changes: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    schedule: Mapping[str, object] | None = None,
) -> None:
    """Refuse to resume `checkpoint` onto another model shape, or (unless `allow_changes`) with another base model,
    exit set, exit weights, exit schedule, layer dropout or (with an anneal) run length than it recorded. Reads
    configs and JSON only; builds shapes on the meta device.

    Args:
        checkpoint: The `checkpoint-N` folder being resumed.
        model_name_or_path: The model of this run (`--model_name_or_path`, resolved).
        exit_layers: This run's exits, ascending.
        exit_loss_weights: Their normalised weights.
        allow_changes: Continue with any of those changes (`--allow_resume_changes`), with a line per change
            instead of a refusal.
        revision, trust_remote_code: As for `AutoConfig.from_pretrained`.
        schedule: This run's exit schedule, layer dropout and (with an anneal) length, as
            [`~soft_peft.checkpoints.run_schedule`] gives them (``None``: not checked). A record without them (an
            older soft-peft's) is resumed with a note.

    Raises:
        UsageError: naming both values, for a model of another shape (always) or a changed setting (unless
            `allow_changes`).
    """
    record = read_run_record(checkpoint)
    if os.path.isfile(os.path.join(checkpoint, "config.json")):  # a full model: its own config is the shape
        trained_config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    elif record is not None:  # a PEFT adapter: the base model's config, recorded
        trained_config = record["base_model_config"]
    else:
        trained_config = None
    if trained_config is not None:
        given = AutoConfig.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        difference = _shape_difference(trained_config, given, trust_remote_code)
        if difference is not None:
            origin = f" ({record['base_model']})" if record and record.get("base_model") else ""
            raise UsageError(
                f"--resume_from_checkpoint {checkpoint} holds a model of another shape than --model_name_or_path "
                f"{model_name_or_path}: {difference}. Resume with the model it was trained from{origin}, or start "
                "afresh without --resume_from_checkpoint."
            )
    if record is None:
        _print_once(
            f"[soft-peft] {checkpoint} has no {RUN_RECORD_FILE} (not saved by SoFTTrainer): its base model, exits, "
            "exit weights and schedule cannot be checked against this run's."
        )
        return
    changes = []
    if record.get("base_model") and not _same_model(record["base_model"], model_name_or_path):
        changes.append(f"--model_name_or_path {record['base_model']} in the checkpoint, {model_name_or_path} now")
    if list(record["exit_layers"]) != list(exit_layers):
        changes.append(f"--exit_layers {record['exit_layers']} in the checkpoint, {list(exit_layers)} now")
    recorded_weights = _weights_text(record["exit_layers"], record["exit_loss_weights"])
    weights = _weights_text(exit_layers, exit_loss_weights)
    if recorded_weights != weights:
        changes.append(f"--exit_loss_weights {recorded_weights} in the checkpoint, {weights} now")
    changes += _schedule_changes(checkpoint, record.get("schedule"), schedule)
    if not changes:
        return
    if not allow_changes:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} was trained with other settings: {'; '.join(changes)}. Resume "
            "with the checkpoint's settings, or pass --allow_resume_changes to continue with the new ones."
        )
    for change in changes:
        _print_once(f"[soft-peft] resuming with a change (--allow_resume_changes): {change}.")
