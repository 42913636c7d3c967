"""What would otherwise pass silently in a run: a Hub token saved with the run's arguments, non-finite weights, a loss
or gradient that turned NaN or infinite, and a run that collapsed to the uniform distribution.

[`SoFTTrainer`] uses each of them, so Python scripts get the same protection as `soft-peft train`.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

__all__ = [
    "COLLAPSE_PATIENCE",
    "NONFINITE_ACTIONS",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "NonFiniteWeightsError",
    "TrainingHealth",
    "check_finite_weights",
    "divergence_message",
    "keep_tokens_unsaved",
    "nonfinite_values",
]

logger = logging.get_logger(__name__)

# Consecutive logged training steps at the uniform loss, or without gradient, before the collapse warning
COLLAPSE_PATIENCE = 3
# How close (in nats) the logged loss must stay to ln(vocabulary size) to count as the uniform distribution
_UNIFORM_LOSS_TOLERANCE = 1e-2
# `on_nonfinite_loss`: end the run at the first NaN or infinite value, or warn and train on (SFTTrainer's behaviour)
NONFINITE_ACTIONS = ("stop", "warn")


class NonFiniteWeightsError(ValueError):
    """A model holds NaN or infinite weights: training it or decoding with it gives NaN."""


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient norm; the run stops before saving such weights."""


class _UnsavedToken(str):
    """A secret that works as the string it is, but is pickled as ``None`` and shown redacted.

    `Trainer` saves its arguments with `torch.save(self.args, ...)` in every checkpoint, the final folder and each
    push to the Hub (`training_args.bin`); the token must work for the push yet never be written.
    """

    __slots__ = ()

    def __reduce__(self):
        return type(None), ()  # unpickles as None

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return "'<redacted token>'"


def keep_tokens_unsaved(args) -> None:
    """Make the secrets in training arguments unsaveable, in place: ``hub_token`` and a ``token`` in
    ``model_init_kwargs`` keep their value (pushes and downloads use it) but are pickled as ``None``.

    Args:
        args: `TrainingArguments` (or `SFTConfig`, `SoFTConfig`).
    """
    token = getattr(args, "hub_token", None)
    if isinstance(token, str) and not isinstance(token, _UnsavedToken):
        args.hub_token = _UnsavedToken(token)
    init_kwargs = getattr(args, "model_init_kwargs", None)
    if isinstance(init_kwargs, dict) and isinstance(init_kwargs.get("token"), str):
        init_kwargs["token"] = _UnsavedToken(init_kwargs["token"])


def check_finite_weights(model: nn.Module, name: str) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first such tensor. One pass over the parameters.

    Args:
        model: The loaded model. Parameters partitioned by ZeRO-3 are checked on this rank's partition; parameters on
            the meta device (not loaded) and integer (quantized) ones are skipped.
        name: The model's folder or Hub id, for the message.

    Raises:
        NonFiniteWeightsError: naming the tensor and how many of its values are not finite.
    """
    for param_name, param in model.named_parameters():
        data = getattr(param, "ds_tensor", param)  # ZeRO-3: this rank's partition
        if data.device.type == "meta" or not data.is_floating_point() or data.numel() == 0:
            continue
        finite = torch.isfinite(data.detach())
        if not bool(finite.all()):
            count = int((~finite).sum())
            raise NonFiniteWeightsError(
                f"{name}: its weight {param_name} holds {count} NaN or infinite value(s) of {data.numel()}, so "
                "every output would be NaN; use a checkpoint saved before the values went bad, or the base model."
            )


def nonfinite_values(logs: dict[str, float], grad_norm_may_overflow: bool = False) -> dict[str, float]:
    """The training values in a `Trainer` log that are NaN or infinite: ``loss``, ``grad_norm``, ``exit_{k}/loss``.

    Args:
        logs: One training log (evaluation logs, prefixed ``eval_``, have no such keys).
        grad_norm_may_overflow: fp16 with a loss scaler: an infinite gradient norm is the scaler's skipped step.
    """
    found = {}
    for key, value in logs.items():
        checked = key == "loss" or (key.startswith("exit_") and key.endswith("/loss"))
        checked = checked or (key == "grad_norm" and not grad_norm_may_overflow)
        if checked and isinstance(value, int | float) and not math.isfinite(value):
            found[key] = value
    return found


def divergence_message(found: dict[str, float], step: int, learning_rate: float, stopped: bool = True) -> str:
    """The one line for a run whose training values ``found`` (``{key: value}``) are not finite at ``step``: the
    error that stops it, or (``stopped=False``) the warning of a run that trains on."""
    shown = ", ".join(f"{key} {value}" for key, value in found.items())
    outcome = (
        "The run stopped without saving a final model"
        if stopped
        else "Training goes on, as on_nonfinite_loss is 'warn' ('stop' ends the run), and the weights it saves may "
        "hold NaN"
    )
    return (
        f"training diverged at step {step}: {shown}. {outcome} (a checkpoint saved since the last finite log may "
        f"hold NaN weights). Lower --learning_rate (now {learning_rate:g}), keep --max_grad_norm above 0, or check "
        "the data and the model's dtype."
    )


class NonFiniteGuard:
    """What a run does with NaN or infinite training values, by the `on_nonfinite_loss` of its arguments (`"warn"`
    when they have none, as a plain `SFTConfig`): `"stop"` raises [`NonFiniteTrainingError`]; `"warn"` prints and
    logs one warning per streak of bad steps and lets the run go on, as `SFTTrainer` would.
    """

    def __init__(self):
        self.warned = False

    def check(self, found: dict[str, float], step: int, args, is_main_process: bool = True) -> None:
        """Act on ``found`` (``{key: value}``, the non-finite values of ``step``; empty when all were finite)."""
        if not found:
            self.warned = False  # a new streak warns again
            return
        if getattr(args, "on_nonfinite_loss", "warn") == "stop":
            raise NonFiniteTrainingError(divergence_message(found, step, args.learning_rate))
        if self.warned:
            return
        self.warned = True
        warning = divergence_message(found, step, args.learning_rate, stopped=False)
        logger.info(warning)  # for a log file; the line below is what a terminal shows
        if is_main_process:
            # On a line of its own, not after the progress bar's carriage return
            print(f"\n[soft-peft] warning: {warning}", file=sys.stderr, flush=True)


class TrainingHealth(TrainerCallback):
    """Hands a logged loss or gradient norm that is NaN or infinite to the run's [`NonFiniteGuard`], and warns once
    when the loss sits at the uniform distribution's value ln(vocabulary size), or the gradient norm is 0, for
    [`COLLAPSE_PATIENCE`] logged training steps in a row (a collapsed run: the model predicts nothing, yet the run
    would end with success).

    Args:
        vocab_size: The model's output vocabulary size (`None`: only the gradient norm is watched).
    """

    def __init__(self, vocab_size: int | None, guard: NonFiniteGuard | None = None):
        self.uniform_loss = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
        self.collapsed_logs = 0
        self.guard = guard or NonFiniteGuard()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Check each training log; a non-finite value goes to the run's [`NonFiniteGuard`]."""
        logs = logs or {}
        if "loss" not in logs:  # evaluation and the end-of-training summary
            return
        found = nonfinite_values(logs, grad_norm_may_overflow=bool(args.fp16))
        self.guard.check(found, state.global_step, args, state.is_world_process_zero)
        if found:  # no collapse test on NaN
            return
        loss, grad_norm = logs["loss"], logs.get("grad_norm")
        at_uniform = self.uniform_loss is not None and abs(loss - self.uniform_loss) <= _UNIFORM_LOSS_TOLERANCE
        self.collapsed_logs = self.collapsed_logs + 1 if at_uniform or grad_norm == 0 else 0
        if self.collapsed_logs == COLLAPSE_PATIENCE:  # once per streak
            self._warn_collapse(args, state, loss, grad_norm)

    def _warn_collapse(self, args, state, loss: float, grad_norm: float | None) -> None:
        what = []
        if self.uniform_loss is not None and abs(loss - self.uniform_loss) <= _UNIFORM_LOSS_TOLERANCE:
            what.append(f"the loss {loss:.4g} is ln(vocabulary size) = {self.uniform_loss:.4g}, a uniform guess")
        if grad_norm == 0:
            what.append("the gradient norm is 0")
        message = (
            f"the run looks collapsed: for {COLLAPSE_PATIENCE} logged steps up to step {state.global_step}, "
            f"{' and '.join(what)}; the model is learning nothing. If a high --learning_rate (now "
            f"{args.learning_rate:g}) did this, lower it and start again from the base model."
        )
        logger.info(message)  # for a log file; the line below is what a terminal shows
        if state.is_world_process_zero:
            print(f"[soft-peft] warning: {message}", file=sys.stderr, flush=True)
