"""[`SoFTConfig`]: TRL's `SFTConfig` plus the SoFT settings, parsable by `TrlParser` from YAML or the command line.

The SoFT fields are those of [`~soft_peft.settings.SoFTSettings`], which `SoFTConfig` inherits. [`read_soft_settings`]
is the one function that turns training arguments into the `SoFTSettings` the trainer passes down: from a
`SoFTConfig`, or from a plain `SFTConfig` (whose `loss_type` is read and whose other SoFT settings get the defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from trl import SFTConfig

from .run_guards import NONFINITE_ACTIONS
from .settings import SoFTSettings, soft_settings

# One import path, the top level: `from soft_peft import SoFTConfig`
__all__ = ["check_training_numbers", "read_soft_settings"]


def _is_number_at_least(value, low: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= low


def check_training_numbers(args) -> None:
    """Refuse the numeric `TrainingArguments` values that torch or the training loop would reject (or silently turn
    into a run that trains nothing) only after the model has loaded: batch sizes, accumulation, learning rate, the
    optimizer's betas, epsilon and weight decay, step counts and intervals, data workers and `max_length`.

    Args:
        args: Any training arguments (`SoFTConfig`, `SFTConfig`, `TrainingArguments`); absent fields are skipped.

    Raises:
        ValueError: for the first value out of range, naming it, its valid range and the value to use.
    """

    def value(name):
        return getattr(args, name, None)

    def refuse(name, rule):
        raise ValueError(f"{name}={value(name)!r} is out of range: {rule}.")

    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if value(name) is not None and not (_is_number_at_least(value(name), 1) and int(value(name)) == value(name)):
            refuse(name, "it must be an integer >= 1")
    if value("eval_accumulation_steps") is not None and not _is_number_at_least(value("eval_accumulation_steps"), 1):
        refuse("eval_accumulation_steps", "it must be >= 1, or unset to accumulate the whole evaluation")
    for name, rule in (
        ("learning_rate", "it must be a finite number >= 0, such as 2e-5"),
        ("weight_decay", "it must be a finite number >= 0 (0 = none)"),
        ("adam_epsilon", "it must be a finite number >= 0, such as 1e-8"),
    ):
        if value(name) is not None and not _is_number_at_least(value(name), 0):
            refuse(name, rule)
    for name in ("adam_beta1", "adam_beta2"):
        beta = value(name)
        if beta is not None and not (_is_number_at_least(beta, 0) and beta < 1):
            refuse(name, "it must be in [0, 1), such as 0.9 for adam_beta1 and 0.999 for adam_beta2")
    max_steps = value("max_steps")
    if max_steps is not None and max_steps < 0 and max_steps != -1:
        refuse("max_steps", "it must be a number of optimizer steps >= 1, or -1 to train num_train_epochs")
    epochs = value("num_train_epochs")
    if (
        (max_steps is None or max_steps <= 0)
        and epochs is not None
        and not (_is_number_at_least(epochs, 0) and epochs > 0)
    ):
        refuse("num_train_epochs", "with max_steps unset (-1) it must be > 0, or the run would train no step")
    if value("dataloader_num_workers") is not None and not _is_number_at_least(value("dataloader_num_workers"), 0):
        refuse("dataloader_num_workers", "it must be an integer >= 0 (0 = load in the main process)")
    if value("max_length") is not None and not _is_number_at_least(value("max_length"), 1):
        refuse("max_length", "it must be a number of tokens >= 1, or None for no truncation")
    for name, strategy in (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy")):
        if str(value(strategy)).lower().endswith("steps") and value(name) is not None:
            if not (isinstance(value(name), (int, float)) and value(name) > 0):
                refuse(
                    name, f"with {strategy}='steps' it must be > 0 (a step count, or a fraction of the run below 1)"
                )


def _refuse_label_smoothing(label_smoothing_factor: float) -> None:
    if label_smoothing_factor > 0:
        raise ValueError(
            f"`label_smoothing_factor={label_smoothing_factor}` is not supported by SoFT: label smoothing "
            "needs every exit's full logits, which the chunked exit loss never builds. Set it to 0."
        )


def _copy_of_checked_settings(config: SoFTConfig) -> SoFTSettings:
    # A SoFTConfig's SoFT fields were checked (and normalised) once, by its `__post_init__`: they are copied into a
    # SoFTSettings without building one, which would check them a second time
    settings = object.__new__(SoFTSettings)
    for f in fields(SoFTSettings):
        value = getattr(config, f.name)
        setattr(settings, f.name, list(value) if isinstance(value, list) else value)  # a list is not shared
    return settings


def read_soft_settings(args) -> SoFTSettings:
    """The SoFT settings of any training arguments, checked once, as [`SoFTConfig`] checks them; `args` is not changed.

    Args:
        args: A [`SoFTConfig`] (checked when it was built: its SoFT fields are copied, not checked again), or any
            other arguments object (`SFTConfig`, a subclass of it, `TrainingArguments`): each
            [`~soft_peft.settings.SoFTSettings`] field it has is read (TRL's `loss_type` among them), the others get
            their defaults, and all of it is checked here.

    Returns:
        A new [`~soft_peft.settings.SoFTSettings`].

    Raises:
        ValueError: for invalid SoFT settings, `label_smoothing_factor > 0`, and the out-of-range numbers of
            [`check_training_numbers`].
    """
    if isinstance(args, SoFTConfig):
        return _copy_of_checked_settings(args)
    settings = soft_settings(**{f.name: getattr(args, f.name) for f in fields(SoFTSettings) if hasattr(args, f.name)})
    _refuse_label_smoothing(getattr(args, "label_smoothing_factor", 0.0))
    check_training_numbers(args)
    return settings


# `SoFTSettings` first, so that its fields come after SFTConfig's (`SoFTConfig("out")` is still the output dir); its
# `loss_type` is TRL's field, with the values SoFT computes at every exit
@dataclass
class SoFTConfig(SoFTSettings, SFTConfig):
    r"""
    Configuration of the [`SoFTTrainer`]: every [`~trl.SFTConfig`] parameter, plus the SoFT fields documented on
    [`~soft_peft.settings.SoFTSettings`] (`exit_layers`, `exit_loss_weights`, `exit_head_grad`,
    `exit_distill_weight`, `exit_distill_temperature`, `exit_vocab_chunk_size`, `exit_loss_kernel`,
    `exit_ramp_steps`, `exit_ramp_order`, `exit_rotation`, `exit_start_steps`, `exit_anneal_fraction`,
    `exit_anneal_floor`, `layer_dropout`, `layer_dropout_scale`, `layer_dropout_ramp_steps`). Each is also a
    command-line flag and a YAML key of `TrlParser` recipes. TRL's `loss_type` is applied at every exit and takes
    `"nll"` or `"dft"`.
    """

    # TRL 1.16 gives the deprecated `gradient_checkpointing` its default (True), so transformers warns on every
    # config, even one that never names it; here the old name is unset and the default goes to the new name
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated name of --activation_checkpointing (which defaults to true, as in TRL)."},
    )

    # `SFTTrainer` trains on through a NaN or infinite loss; "warn" keeps that (a drop-in), and says so loudly once
    # per streak of bad steps. `soft-peft train` defaults to "stop": a command-line run must not end in success
    on_nonfinite_loss: str = field(
        default="warn",
        metadata={
            "help": "What a NaN or infinite loss or gradient norm does: 'stop' (raise NonFiniteTrainingError before "
            "the update, no final save; the default of `soft-peft train`) or 'warn' (print and log a warning and "
            "train on, as SFTTrainer does; the default in Python).",
            "choices": list(NONFINITE_ACTIONS),
        },
    )

    def __post_init__(self):
        if self.on_nonfinite_loss not in NONFINITE_ACTIONS:
            raise ValueError(
                f"on_nonfinite_loss must be one of {NONFINITE_ACTIONS} ('stop': end the run at the first NaN or "
                f"infinite loss; 'warn': warn and train on), got {self.on_nonfinite_loss!r}."
            )
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under the name transformers reads
        SFTConfig.__post_init__(self)
        SoFTSettings.__post_init__(self)
        _refuse_label_smoothing(self.label_smoothing_factor)
        check_training_numbers(self)
