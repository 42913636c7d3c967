"""[`SoFTSettings`]: every SoFT setting, in one dataclass validated once, passed down from the trainer to the loss.

`SoFTConfig` inherits it (so each field is also a command-line flag and a YAML key),
[`~soft_peft.wrapper.SortedLossWrapper`] and [`~soft_peft.wrapper.add_sorted_exit_loss`] take it, and the pure loss
reads its knobs through the [`~soft_peft.loss.ExitLossOptions`] it extends. Every SoFT field is declared here, with
its command-line help (the loss knobs too: the small options object of the pure loss has no help text, so the loss
never imports this module). A new SoFT setting is one new field here (and its check in `__post_init__`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .exit_weights import DEFAULT_EXIT_LOSS_WEIGHTS, exit_loss_weights, parse_exit_loss_weights
from .exits import parse_exit_spec
from .layer_dropout import LAYER_DROPOUT_SCALES, LayerDropout
from .loss import DEFAULT_VOCAB_CHUNK_SIZE, HEAD_GRAD_MODES, KERNELS, LOSS_TYPES, ExitLossOptions
from .schedule import RAMP_ORDERS, ExitSchedule

# One import path, the top level: `from soft_peft import SoFTSettings`
__all__ = ["soft_settings"]


def _normalize_list_setting(value, name: str):
    """YAML and Python give lists; the command line gives a string. Keep lists, strip strings."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    if isinstance(value, str):
        text = value.strip()
        return None if text.lower() in ("", "none", "null", "default") else text
    raise ValueError(f"`{name}` must be a string or a list, got {type(value).__name__} {value!r}.")


@dataclass
class SoFTSettings(ExitLossOptions):
    r"""
    Every setting of the SoFT loss: the loss knobs the pure loss reads as a [`~soft_peft.loss.ExitLossOptions`]
    (`loss_type`, `exit_loss_kernel`, `exit_vocab_chunk_size`, `exit_head_grad`, `exit_distill_weight`,
    `exit_distill_temperature`), which exits, their weights, the exit schedule and layer dropout. Every value is
    checked once, when the object is built (`__post_init__`); what needs the model's depth (exit range, explicit
    weight count) is checked when it is attached to a model.

    "Exit k" is the hidden state after k decoder layers through the model's own final norm and shared LM head. The
    *deepest exit* is the deepest of `exit_layers` (the model's last layer with the default exits); the early exits
    are the others.

    Parameters:
        loss_type (`str`, *optional*, defaults to `"nll"`):
            TRL's `loss_type`, applied at every exit: `"nll"` (cross-entropy) or `"dft"` (Dynamic Fine-Tuning: each
            token's NLL times its detached probability).
        exit_loss_kernel (`str`, *optional*, defaults to `"auto"`):
            Head kernel: `"trl"` (TRL's `ChunkedLogProbFunction`, Triton on CUDA/XPU), `"torch"`
            (`soft_peft.chunked_ce`, faster without Triton) or `"auto"` (TRL's where it runs Triton, else torch).
        exit_vocab_chunk_size (`int`, *optional*, defaults to `32768`):
            Vocabulary columns per tile of TRL's chunked head kernel. Lower it to cut peak memory on very large
            vocabularies; raise it to cut kernel launches.
        exit_head_grad (`str`, *optional*, defaults to `"all"`):
            `"all"`: every exit's loss updates the shared final norm and LM head (the paper). `"last"`: only the
            deepest exit (the last in order of depth) updates them; the early exits use them without updating them
            (their gradient still trains the layers below), so the norm and head (with a tied head, also the input
            embedding through it) are trained by the deepest exit alone.
        exit_distill_weight (`float`, *optional*, defaults to `0.0`):
            Self-distillation `lambda` in [0, 1]: each early exit's loss becomes `(1 - lambda) * CE + lambda * T^2 *
            KL(p_deepest || p_exit)` on the labelled tokens, with the deepest exit's distribution detached. `0` is
            off; when on, `exit_{k}/agreement` (top-1 agreement with the deepest exit) and `exit_{k}/distill_loss`
            are logged.
        exit_distill_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature `T` of the distillation term (both distributions are `softmax(logits / T)`).
        exit_layers (`str` or `list[int]`, *optional*):
            Decoder layers whose outputs are trained as sub-models. A list, a comma-separated string `"12,16,20"`,
            or a slice string `"start:stop:step"` (`"12:41:4"` = 12, 16, ..., 40; `"9::3"` = every 3rd layer from 9
            to the last). Defaults to the paper's 8 evenly spaced exits from 30% depth to the last layer: layer
            `round(L * (3 + i) / 10)` for `i = 0..7`.
        exit_loss_weights (`str` or `list[float]`, *optional*, defaults to `"last:0.75"`):
            How the exits' losses are combined: `"last:w"` (the deepest exit, the last of `exit_layers` in order of
            depth, keeps weight `w` in (0, 1] and the early exits share `1 - w` equally; with the default exits the
            deepest exit is the model's last layer; the default `"last:0.75"` was chosen by the quality study in
            `docs/results.md`), `"uniform"` (the paper's mean over exits), `"linear"` (weight proportional to
            depth) or one finite, non-negative weight per exit (`"1,1,2"` on the command line), in the order
            `exit_layers` lists them (`exit_layers="30,9"` with `"1,0"` trains exit 30). Normalised to sum to 1;
            each exit's summed token loss is divided by the same token count as `SFTTrainer`'s
            (`num_items_in_batch`). Only the exits with a weight above 0 are recorded as trained.
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
            Late start: the first `exit_start_steps` optimizer steps train the deepest exit alone (plain SFT), then
            the early exits join (a ramp and a rotation count from there). 0 = every exit from the first step.
        exit_anneal_fraction (`float`, *optional*, defaults to `0.0`):
            Over the final fraction `f` in [0, 1) of the run's optimizer steps (`max_steps`, however it was set),
            the early exits' share of the loss decays linearly to `exit_anneal_floor` times its value and the
            deepest exit takes the rest (weights still sum to 1; the last step gets exactly the floor). 0 = off.
        exit_anneal_floor (`float`, *optional*, defaults to `0.0`):
            The factor in [0, 1] of the early exits' weights at the last step of an anneal: 0 makes the last step
            plain SFT on the deepest exit. Needs `exit_anneal_fraction > 0`.
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

    # The loss knobs of ExitLossOptions, declared again with their help: every SoFT field is defined here
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "Loss at every exit (TRL's loss_type): 'nll' (cross-entropy) or 'dft' (Dynamic Fine-Tuning, "
            "https://huggingface.co/papers/2508.05629).",
            "choices": list(LOSS_TYPES),
        },
    )
    exit_loss_kernel: str = field(
        default="auto",
        metadata={
            "help": "Head kernel of the exit loss: 'trl' (TRL's chunked log-prob kernel, Triton on GPU), 'torch' "
            "(soft_peft.chunked_ce, faster without Triton) or 'auto' (TRL's where Triton runs, else torch).",
            "choices": list(KERNELS),
        },
    )
    exit_vocab_chunk_size: int = field(
        default=DEFAULT_VOCAB_CHUNK_SIZE,
        metadata={"help": "Vocabulary columns per tile of TRL's chunked head kernel (memory/speed trade-off)."},
    )
    exit_head_grad: str = field(
        default="all",
        metadata={
            "help": "Which exits update the shared final norm and LM head: 'all' (paper) or 'last' (only the deepest "
            "exit; the early exits use them without updating them, their gradient still trains the layers below).",
            "choices": list(HEAD_GRAD_MODES),
        },
    )
    exit_distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Self-distillation lambda in [0, 1]: each early exit's loss becomes (1 - lambda) * CE + lambda * "
            "T^2 * KL(p_deepest || p_exit), deepest exit detached. 0 = off."
        },
    )
    exit_distill_temperature: float = field(
        default=1.0, metadata={"help": "Temperature T of the self-distillation term (> 0)."}
    )

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
            "help": "Per-exit loss weights: 'last:w' (the deepest exit keeps w, the others share 1 - w; default "
            "'last:0.75'), 'uniform' (the paper), 'linear' (deeper exits weigh more), or one non-negative weight per "
            "exit such as '1,1,2', in the order exit_layers lists them (normalised to sum to 1)."
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
            "choices": list(RAMP_ORDERS),
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
    exit_anneal_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Final fraction in [0, 1) of the run's optimizer steps over which the early exits' share of the "
            "loss decays linearly to exit_anneal_floor times its value, the deepest exit taking the rest (0 = off)."
        },
    )
    exit_anneal_floor: float = field(
        default=0.0,
        metadata={
            "help": "Factor in [0, 1] of the early exits' weights at the last step of the anneal (0 = the last step "
            "is plain SFT on the deepest exit); needs exit_anneal_fraction > 0."
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
        ExitLossOptions.__post_init__(self)
        self.exit_layers = _normalize_list_setting(self.exit_layers, "exit_layers")
        self.exit_loss_weights = (
            _normalize_list_setting(self.exit_loss_weights, "exit_loss_weights") or DEFAULT_EXIT_LOSS_WEIGHTS
        )
        # Only the syntax can be checked here: the range needs the model's depth (checked when the loss is attached
        # to a model, and by the training script from config.json before the weights load)
        layers = parse_exit_spec(self.exit_layers)
        weights = parse_exit_loss_weights(self.exit_loss_weights)
        if isinstance(weights, list) and isinstance(layers, list):  # explicit on both sides: their counts must agree
            exit_loss_weights(weights, layers)
        self.exit_schedule()  # validates the schedule fields
        self.layer_dropout_settings()  # and the layer dropout's

    def exit_schedule(self) -> ExitSchedule:
        """The [`~soft_peft.schedule.ExitSchedule`] of `exit_ramp_steps`, `exit_ramp_order`, `exit_rotation`,
        `exit_start_steps`, `exit_anneal_fraction` and `exit_anneal_floor`."""
        return ExitSchedule(
            self.exit_ramp_steps,
            self.exit_ramp_order,
            self.exit_rotation,
            self.exit_start_steps,
            self.exit_anneal_fraction,
            self.exit_anneal_floor,
        )

    def layer_dropout_settings(self, seed: int = 0) -> LayerDropout:
        """The [`~soft_peft.layer_dropout.LayerDropout`] of `layer_dropout`, `layer_dropout_scale` and
        `layer_dropout_ramp_steps`, drawing with `seed`."""
        return LayerDropout(self.layer_dropout, self.layer_dropout_scale, self.layer_dropout_ramp_steps, seed)


_FIELD_NAMES = frozenset(f.name for f in fields(SoFTSettings))


def soft_settings(settings: SoFTSettings | None = None, **overrides) -> SoFTSettings:
    """A new [`SoFTSettings`]: the fields of `settings` (or the defaults), with `overrides` applied, checked once.

    Args:
        settings: A [`SoFTSettings`] or anything with its fields (a `SoFTConfig`: only the SoFT fields are read), or
            ``None`` for the defaults.
        **overrides: [`SoFTSettings`] fields, such as ``exit_layers=[2, 4]``.

    Returns:
        A new [`SoFTSettings`]; `settings` is not changed.

    Raises:
        TypeError: for an override that is not a [`SoFTSettings`] field, naming the valid ones.
        ValueError: for an invalid value (see [`SoFTSettings`]).
    """
    unknown = sorted(set(overrides) - _FIELD_NAMES)
    if unknown:
        raise TypeError(
            f"{unknown} {'is not a SoFT setting' if len(unknown) == 1 else 'are not SoFT settings'}; the settings are "
            f"the fields of SoFTSettings: {', '.join(sorted(_FIELD_NAMES))}."
        )
    values = {} if settings is None else {name: getattr(settings, name) for name in _FIELD_NAMES}
    return SoFTSettings(**{**values, **overrides})
