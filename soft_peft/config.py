"""[`SoFTConfig`]: TRL's `SFTConfig` plus the SoFT settings, parsable by `TrlParser` from YAML or the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .loss import DEFAULT_VOCAB_CHUNK_SIZE, exit_loss_weights

__all__ = ["SoFTConfig"]


def _normalize_list_setting(value, name: str):
    """YAML and Python give lists; the command line gives a string. Keep lists, strip strings."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    if isinstance(value, str):
        text = value.strip()
        return None if text.lower() in ("", "none", "null", "default") else text
    raise ValueError(f"`{name}` must be a string or a list, got {type(value).__name__} {value!r}.")


@dataclass
class SoFTConfig(SFTConfig):
    r"""
    Configuration of the [`SoFTTrainer`]: every [`~trl.SFTConfig`] parameter, plus:

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
        super().__post_init__()
        from .exits import parse_exit_spec

        self.exit_layers = _normalize_list_setting(self.exit_layers, "exit_layers")
        self.exit_loss_weights = _normalize_list_setting(self.exit_loss_weights, "exit_loss_weights") or "uniform"
        # Only the syntax can be checked here: the range needs the model's depth (checked by the trainer, and by the
        # training script from config.json before the weights load)
        layers = parse_exit_spec(self.exit_layers)
        weights = self.exit_loss_weights
        if isinstance(weights, list) or weights.lower() not in ("uniform", "linear"):
            # Check the numbers now, and their count when the exits are explicit
            count = (
                len(weights)
                if isinstance(weights, list)
                else len([w for w in weights.replace(" ", ",").split(",") if w])
            )
            exit_loss_weights(weights, layers if isinstance(layers, list) else [0] * count)
        if self.exit_vocab_chunk_size < 1:
            raise ValueError(f"`exit_vocab_chunk_size` must be >= 1, got {self.exit_vocab_chunk_size}.")
        if self.label_smoothing_factor > 0:
            raise ValueError(
                f"`label_smoothing_factor={self.label_smoothing_factor}` is not supported by SoFT: label smoothing "
                "needs every exit's full logits, which the chunked exit loss never builds. Set it to 0."
            )
