"""[`SoFTConfig`]: TRL's `SFTConfig` plus the SoFT settings, parsable by `TrlParser` from YAML or the command line.

The SoFT fields live in one dataclass, [`SoFTSettings`], which `SoFTConfig` inherits. [`read_soft_settings`] reads
them from any training arguments (a `SoFTConfig`, or a plain `SFTConfig` that gets the defaults), so `SoFTTrainer`
never copies the user's config. A new SoFT setting is one new field of `SoFTSettings` (and its check in
`_check_settings`): `SoFTConfig`, the command line and `read_soft_settings` pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from trl import SFTConfig

from .loss import DEFAULT_VOCAB_CHUNK_SIZE, exit_loss_weights

__all__ = ["SoFTConfig", "SoFTSettings", "read_soft_settings"]

# The syntax of `exit_layers` is checked here; its range needs the model's depth and is checked by the trainer
_SYNTAX_CHECK_DEPTH = 1_000_000


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
        exit_loss_weights (`str` or `list[float]`, *optional*, defaults to `"uniform"`):
            How the exits' losses are combined: `"uniform"` (the paper's mean), `"linear"` (weight proportional to
            depth) or one non-negative weight per exit (`"1,1,2"` on the command line). Normalised to sum to 1.
        exit_vocab_chunk_size (`int`, *optional*, defaults to `32768`):
            Vocabulary columns per tile of TRL's chunked head kernel. Lower it to cut peak memory on very large
            vocabularies; raise it to cut kernel launches.
        exit_loss_kernel (`str`, *optional*, defaults to `"auto"`):
            Head kernel of the exit loss: `"trl"` (TRL's `ChunkedLogProbFunction`, Triton on CUDA/XPU), `"torch"`
            (`soft_peft.chunked_ce`, faster without Triton) or `"auto"` (TRL's where it runs Triton, else torch).
    """

    exit_layers: str | None = field(
        default=None,
        metadata={
            "help": "Exits to train: '12,16,20', a slice 'start:stop:step' such as '12:41:4', or a YAML list. "
            "Default: the paper's 8 evenly spaced exits from 30 percent depth to the last layer."
        },
    )
    exit_loss_weights: str = field(
        default="uniform",
        metadata={
            "help": "Per-exit loss weights: 'uniform' (paper), 'linear' (deeper exits weigh more), or one "
            "non-negative weight per exit such as '1,1,2' (normalised to sum to 1)."
        },
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

    def __post_init__(self):
        _check_settings(self)


def _check_settings(settings: SoFTSettings) -> None:
    """Normalise the SoFT fields of `settings` in place and raise `ValueError` for invalid ones."""
    from .exits import parse_exit_layers

    settings.exit_layers = _normalize_list_setting(settings.exit_layers, "exit_layers")
    settings.exit_loss_weights = _normalize_list_setting(settings.exit_loss_weights, "exit_loss_weights") or "uniform"
    layers = parse_exit_layers(settings.exit_layers, _SYNTAX_CHECK_DEPTH) if settings.exit_layers is not None else None
    weights = settings.exit_loss_weights
    if isinstance(weights, list) or weights.lower() not in ("uniform", "linear"):
        # Check the numbers now; their count is checked against the exits here when they are explicit
        count = (
            len(weights) if isinstance(weights, list) else len([w for w in weights.replace(" ", ",").split(",") if w])
        )
        exit_loss_weights(weights, layers or [0] * count)
    if settings.exit_vocab_chunk_size < 1:
        raise ValueError(f"`exit_vocab_chunk_size` must be >= 1, got {settings.exit_vocab_chunk_size}.")
    if settings.exit_loss_kernel not in ("auto", "trl", "torch"):
        raise ValueError(f"`exit_loss_kernel` must be 'auto', 'trl' or 'torch', got {settings.exit_loss_kernel!r}.")


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
        ValueError: for invalid SoFT settings, and for `label_smoothing_factor > 0`.
    """
    settings = SoFTSettings(**{f.name: getattr(args, f.name) for f in fields(SoFTSettings) if hasattr(args, f.name)})
    _refuse_label_smoothing(getattr(args, "label_smoothing_factor", 0.0))
    return settings


# `SoFTSettings` first, so that its fields come after SFTConfig's (`SoFTConfig("out")` is still the output dir)
@dataclass
class SoFTConfig(SoFTSettings, SFTConfig):
    r"""
    Configuration of the [`SoFTTrainer`]: every [`~trl.SFTConfig`] parameter, plus the [`SoFTSettings`]:

    Parameters:
        exit_layers (`str` or `list[int]`, *optional*):
            Decoder layers trained as sub-models: a list, `"12,16,20"` or a slice string `"start:stop:step"`.
            Defaults to the paper's 8 evenly spaced exits from 30% depth to the last layer.
        exit_loss_weights (`str` or `list[float]`, *optional*, defaults to `"uniform"`):
            `"uniform"`, `"linear"` or one non-negative weight per exit.
        exit_vocab_chunk_size (`int`, *optional*, defaults to `32768`):
            Vocabulary columns per tile of the chunked head kernel.
        exit_loss_kernel (`str`, *optional*, defaults to `"auto"`):
            `"trl"`, `"torch"` or `"auto"`.
    """

    def __post_init__(self):
        SFTConfig.__post_init__(self)
        _check_settings(self)
        _refuse_label_smoothing(self.label_smoothing_factor)
