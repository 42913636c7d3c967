"""[`SoFTConfig`]: TRL's `SFTConfig` plus the SoFT settings, parsable by `TrlParser` from YAML or the command line.

The SoFT fields live in one dataclass, [`SoFTSettings`], which `SoFTConfig` inherits. [`read_soft_settings`] reads
them from any training arguments (a `SoFTConfig`, or a plain `SFTConfig` that gets the defaults), so `SoFTTrainer`
never copies the user's config. A new SoFT setting is one new field of `SoFTSettings` (and its check in
`_check_settings`): `SoFTConfig`, the command line and `read_soft_settings` pick it up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from trl import SFTConfig

from .layer_dropout import LAYER_DROPOUT_SCALES, LayerDropout
from .loss import (
    DEFAULT_EXIT_LOSS_WEIGHTS,
    DEFAULT_VOCAB_CHUNK_SIZE,
    HEAD_GRAD_MODES,
    KERNELS,
    exit_loss_weights,
    parse_exit_loss_weights,
    validate_exit_controls,
)
from .schedule import ExitSchedule

__all__ = ["SoFTConfig", "SoFTSettings", "check_training_numbers", "read_soft_settings"]


def _normalize_list_setting(value, name: str):
    """YAML and Python give lists; the command line gives a string. Keep lists, strip strings."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    if isinstance(value, str):
        text = value.strip()
        return None if text.lower() in ("", "none", "null", "default") else text
    raise ValueError(f"`{name}` must be a string or a list, got {type(value).__name__} {value!r}.")


@dataclass
class SoFTSettings:
    r"""
    The settings SoFT adds to [`~trl.SFTConfig`]; [`SoFTConfig`] inherits them. Read them from any training arguments
    with [`read_soft_settings`].

    Parameters:
        exit_layers (`str` or `list[int]`, *optional*):
            Decoder layers whose outputs are trained as sub-models ("exit k" = the hidden state after k layers, through
            the model's final norm and shared LM head). A list, a comma-separated string `"12,16,20"`, or a slice
            string `"start:stop:step"` (`"12:41:4"` = 12, 16, ..., 40). Defaults to the paper's 8 evenly spaced exits
            from 30% depth to the last layer: layer `round(L * (3 + i) / 10)` for `i = 0..7`.
        exit_loss_weights (`str` or `list[float]`, *optional*, defaults to `"last:0.75"`):
            How the exits' losses are combined: `"last:w"` (the last exit keeps weight `w` in (0, 1], the other exits
            share `1 - w` equally; the default `"last:0.75"` was chosen by the quality study in `docs/results.md`),
            `"uniform"` (the paper's mean over exits), `"linear"` (weight proportional to depth) or one finite,
            non-negative weight per exit (`"1,1,2"` on the command line), in the order `exit_layers` lists them
            (`exit_layers="30,9"` with `"1,0"` trains exit 30). Normalised to sum to 1; each exit's summed token
            loss is divided by the same token count as `SFTTrainer`'s (`num_items_in_batch`). Only the exits with a
            weight above 0 are recorded as trained.
        exit_head_grad (`str`, *optional*, defaults to `"all"`):
            `"all"`: every exit's loss updates the shared final norm and LM head (the paper). `"last"`: the early exits
            use them without updating them (their gradient still trains the layers below), so the norm and head (with
            a tied head, also the input embedding through it) are trained by the last exit alone.
        exit_distill_weight (`float`, *optional*, defaults to `0.0`):
            Self-distillation `lambda` in [0, 1]: each early exit's loss becomes `(1 - lambda) * CE + lambda * T^2 *
            KL(p_last || p_exit)` on the labelled tokens, with the last exit's distribution detached. `0` is off;
            when on, `exit_{k}/agreement` (top-1 agreement with the last exit) and `exit_{k}/distill_loss` are logged.
        exit_distill_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature `T` of the distillation term (both distributions are `softmax(logits / T)`).
        exit_vocab_chunk_size (`int`, *optional*, defaults to `32768`):
            Vocabulary columns per tile of TRL's chunked head kernel. Lower it to cut peak memory on very large
            vocabularies; raise it to cut kernel launches.
        exit_loss_kernel (`str`, *optional*, defaults to `"auto"`):
            Head kernel of the exit loss: `"trl"` (TRL's `ChunkedLogProbFunction`, Triton on CUDA/XPU), `"torch"`
            (`soft_peft.chunked_ce`, faster without Triton) or `"auto"` (TRL's where it runs Triton, else torch).
        exit_ramp_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps over which the early exits' weights are ramped in from 0 (the deepest exit keeps its
            weight; weights renormalised to sum to 1, so training starts as plain SFT). 0 = no ramp.
        exit_ramp_order (`str`, *optional*, defaults to `"deepest_first"`):
            `"deepest_first"` (each early exit ramps in its own window, deepest first, as LayerSkip's gradual
            curriculum) or `"all"` (every early exit ramps together).
        exit_rotation (`int`, *optional*, defaults to `0`):
            Train only this many early exits per step besides the deepest, in rotation (weights scaled so a full
            cycle equals the unrotated loss). Skipped exits never reach the head, which cuts time. 0 = every exit.
        exit_start_steps (`int`, *optional*, defaults to `0`):
            Late start: the first `exit_start_steps` optimizer steps train the deepest exit alone (plain SFT), then the
            early exits join (a ramp and a rotation count from there). 0 = every exit from the first step.
        layer_dropout (`float`, *optional*, defaults to `0.0`):
            LayerSkip's layer dropout: the largest probability `p_max` in [0, 1) that a sample skips a decoder layer
            in a training forward (the layer is the identity for it). 0 = off. Never active in evaluation or decoding.
        layer_dropout_scale (`str`, *optional*, defaults to `"exp"`):
            How the drop probability grows with depth: `"exp"` (LayerSkip's, `p_max * (2 ** (l / (L - 1)) - 1)` for
            layer index `l`), `"linear"` (`p_max * l / (L - 1)`) or `"constant"` (`p_max` for every layer).
        layer_dropout_ramp_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps over which the drop probability rises from 0 to its full value (LayerSkip's exponential
            time curriculum); 0 = the full probability from the first step.
    """

    exit_layers: str | None = field(
        default=None,
        metadata={
            "help": "Exits to train: '12,16,20', a slice 'start:stop:step' such as '12:41:4', or a YAML list. "
            "Default: the paper's 8 evenly spaced exits from 30 percent depth to the last layer."
        },
    )
    exit_loss_weights: str = field(
        default=DEFAULT_EXIT_LOSS_WEIGHTS,
        metadata={
            "help": "Per-exit loss weights: 'last:w' (the last exit keeps w, the others share 1 - w; default "
            "'last:0.75'), 'uniform' (the paper), 'linear' (deeper exits weigh more), or one non-negative weight per "
            "exit such as '1,1,2', in the order exit_layers lists them (normalised to sum to 1)."
        },
    )
    exit_head_grad: str = field(
        default="all",
        metadata={
            "help": "Which exits update the shared final norm and LM head: 'all' (paper) or 'last' (early exits use "
            "them without updating them; their gradient still trains the layers below).",
            "choices": list(HEAD_GRAD_MODES),
        },
    )
    exit_distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Self-distillation lambda in [0, 1]: each early exit's loss becomes (1 - lambda) * CE + lambda * "
            "T^2 * KL(p_last || p_exit), last exit detached. 0 = off."
        },
    )
    exit_distill_temperature: float = field(
        default=1.0, metadata={"help": "Temperature T of the self-distillation term (> 0)."}
    )
    exit_vocab_chunk_size: int = field(
        default=DEFAULT_VOCAB_CHUNK_SIZE,
        metadata={"help": "Vocabulary columns per tile of TRL's chunked head kernel (memory/speed trade-off)."},
    )
    exit_loss_kernel: str = field(
        default="auto",
        metadata={
            "help": "Head kernel of the exit loss: 'trl' (TRL's chunked log-prob kernel, Triton on GPU), 'torch' "
            "(soft_peft.chunked_ce, faster without Triton) or 'auto' (TRL's where Triton runs, else torch).",
            "choices": ["auto", "trl", "torch"],
        },
    )

    exit_ramp_steps: int = field(
        default=0,
        metadata={"help": "Steps over which the early exits are ramped in from weight 0 (0 = no ramp)."},
    )
    exit_ramp_order: str = field(
        default="deepest_first",
        metadata={
            "help": "Order of the exit ramp: 'deepest_first' (one early exit after another) or 'all' (together).",
            "choices": ["deepest_first", "all"],
        },
    )
    exit_rotation: int = field(
        default=0,
        metadata={"help": "Early exits trained per step besides the deepest, in rotation (0 = all, every step)."},
    )
    exit_start_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of plain SFT (the deepest exit alone) before the early exits join (0 = from the start)."
        },
    )
    layer_dropout: float = field(
        default=0.0,
        metadata={
            "help": "LayerSkip's layer dropout: largest probability in [0, 1) that a training sample skips a decoder "
            "layer (rising with depth, see layer_dropout_scale). 0 = off."
        },
    )
    layer_dropout_scale: str = field(
        default="exp",
        metadata={
            "help": "Layer dropout over depth: 'exp' (LayerSkip's), 'linear' or 'constant'.",
            "choices": list(LAYER_DROPOUT_SCALES),
        },
    )
    layer_dropout_ramp_steps: int = field(
        default=0,
        metadata={"help": "Steps over which the layer dropout rises to its full rate (0 = full rate from the start)."},
    )

    def __post_init__(self):
        _check_settings(self)

    def exit_schedule(self) -> ExitSchedule:
        """The [`~soft_peft.schedule.ExitSchedule`] of `exit_ramp_steps`, `exit_ramp_order` and `exit_rotation`."""
        return ExitSchedule(self.exit_ramp_steps, self.exit_ramp_order, self.exit_rotation, self.exit_start_steps)

    def layer_dropout_settings(self) -> LayerDropout:
        """The [`~soft_peft.layer_dropout.LayerDropout`] of `layer_dropout`, `layer_dropout_scale` and
        `layer_dropout_ramp_steps`."""
        return LayerDropout(self.layer_dropout, self.layer_dropout_scale, self.layer_dropout_ramp_steps)


def _check_settings(settings: SoFTSettings) -> None:
    """Normalise the SoFT fields of `settings` in place and raise `ValueError` for invalid ones."""
    from .exits import parse_exit_spec

    settings.exit_layers = _normalize_list_setting(settings.exit_layers, "exit_layers")
    settings.exit_loss_weights = (
        _normalize_list_setting(settings.exit_loss_weights, "exit_loss_weights") or DEFAULT_EXIT_LOSS_WEIGHTS
    )
    # Only the syntax can be checked here: the range needs the model's depth (checked by the trainer, and by the
    # training script from config.json before the weights load)
    layers = parse_exit_spec(settings.exit_layers)
    weights = parse_exit_loss_weights(settings.exit_loss_weights)
    if isinstance(weights, list) and isinstance(layers, list):  # explicit on both sides: their counts must agree
        exit_loss_weights(weights, layers)
    settings.exit_schedule()  # validates the schedule fields
    settings.layer_dropout_settings()  # and the layer dropout's
    validate_exit_controls(settings.exit_head_grad, settings.exit_distill_weight, settings.exit_distill_temperature)
    if settings.exit_vocab_chunk_size < 1:
        raise ValueError(f"`exit_vocab_chunk_size` must be >= 1, got {settings.exit_vocab_chunk_size}.")
    if settings.exit_loss_kernel not in KERNELS:
        raise ValueError(f"`exit_loss_kernel` must be one of {KERNELS}, got {settings.exit_loss_kernel!r}.")


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


def read_soft_settings(args) -> SoFTSettings:
    """The SoFT settings of any training arguments, checked as [`SoFTConfig`] checks them; `args` is not changed.

    Args:
        args: A [`SoFTConfig`], or any other arguments object (`SFTConfig`, a subclass of it, `TrainingArguments`):
            each [`SoFTSettings`] field it has is read, the others get their defaults.

    Returns:
        A new [`SoFTSettings`].

    Raises:
        ValueError: for invalid SoFT settings, `label_smoothing_factor > 0`, and the out-of-range numbers of
            [`check_training_numbers`].
    """
    settings = SoFTSettings(**{f.name: getattr(args, f.name) for f in fields(SoFTSettings) if hasattr(args, f.name)})
    _refuse_label_smoothing(getattr(args, "label_smoothing_factor", 0.0))
    check_training_numbers(args)
    return settings


# `SoFTSettings` first, so that its fields come after SFTConfig's (`SoFTConfig("out")` is still the output dir)
@dataclass
class SoFTConfig(SoFTSettings, SFTConfig):
    r"""
    Configuration of the [`SoFTTrainer`]: every [`~trl.SFTConfig`] parameter, plus the SoFT fields documented on
    [`SoFTSettings`] (`exit_layers`, `exit_loss_weights`, `exit_head_grad`, `exit_distill_weight`,
    `exit_distill_temperature`, `exit_vocab_chunk_size`, `exit_loss_kernel`, `exit_ramp_steps`, `exit_ramp_order`,
    `exit_rotation`, `exit_start_steps`, `layer_dropout`, `layer_dropout_scale`, `layer_dropout_ramp_steps`). Each is
    also a command-line flag and a YAML key of `TrlParser` recipes.
    """

    def __post_init__(self):
        SFTConfig.__post_init__(self)
        _check_settings(self)
        _refuse_label_smoothing(self.label_smoothing_factor)
        check_training_numbers(self)
