"""What an exit is, and where a model keeps the pieces that make one.

"Exit k" is the hidden state after k decoder layers (``hidden_states[k]`` in transformers), passed through the model's
own final norm and its one shared LM head, with the model's logit post-processing (Gemma-2/3 softcapping, Cohere
``logit_scale``, Granite ``logits_scaling``). Exit ``num_layers`` is the model's ordinary output: transformers already
returns the last hidden state normed, so the norm is never applied twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig

__all__ = [
    "ExitHead",
    "default_exit_layers",
    "find_exit_head",
    "find_final_norm",
    "get_decoder_layers",
    "num_decoder_layers",
    "parse_exit_layers",
    "parse_exit_spec",
    "record_exit_layers",
    "recorded_exit_layers",
    "unwrap_model",
]

# The paper's 8 sub-models of a 40-layer LLaMA-2 13B are layers 12, 16, ..., 40: exit i sits at (3 + i) / 10 of depth.
_DEFAULT_NUM_EXITS = 8
_DEFAULT_FIRST_FRACTION = 0.3
_DEFAULT_STEP_FRACTION = 0.1

_LAYER_NAMES = ("layers", "h", "blocks", "block")

CONFIG_KEY = "soft_exit_layers"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model under PEFT, DDP or DeepSpeed wrappers (the one that owns ``config``)."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            inner = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def num_decoder_layers(model: nn.Module | PretrainedConfig) -> int:
    """Number of decoder layers of a causal LM, read from its (text) config.

    Args:
        model: The model, or only its config (``AutoConfig.from_pretrained(path)``: the depth without the weights).
    """
    config = model if isinstance(model, PretrainedConfig) else unwrap_model(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{type(model).__name__}'s config has no usable `num_hidden_layers` ({num_layers!r}).")
    return num_layers


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
    """A syntax error in an ``exit_layers`` setting; the public parsers add the advice that fits what they know."""


def _invalid(message: str, num_layers: int) -> ValueError:
    example = ",".join(str(k) for k in default_exit_layers(num_layers))
    return ValueError(
        f"{message} The model has {num_layers} decoder layers, so exits must be distinct integers in 1..{num_layers}, "
        f"e.g. exit_layers=[{example}] or the slice string '{default_exit_layers(num_layers)[0]}:{num_layers + 1}:1'."
    )


def _parse_syntax(spec: str | Sequence[int]) -> list[int] | slice:
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise _SpecError(f"Cannot parse exit_layers={spec!r} as 'start:stop:step'.")
            try:
                start, stop, step = (int(p) if p.strip() else None for p in (parts + [""])[:3])
            except ValueError:
                raise _SpecError(f"exit_layers={spec!r} has a non-integer slice bound.") from None
            start = 1 if start is None else start
            step = 1 if step is None else step
            if step < 1:
                raise _SpecError(f"exit_layers={spec!r} needs a positive step.")
            if start < 1:
                raise _SpecError(f"exit_layers={spec!r} starts at layer {start}; layers are counted from 1.")
            if stop is None:  # up to the last layer: only the model's depth can resolve it
                return slice(start, None, step)
            layers = list(range(start, stop, step))
        else:
            try:
                layers = [int(p) for p in text.replace(" ", ",").split(",") if p]
            except ValueError:
                raise _SpecError(f"exit_layers={spec!r} is not a list of integers.") from None
    else:
        layers = list(spec)
    for layer in layers:
        # bool is an int subclass; a float such as 12.0 is rejected rather than truncated
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise _SpecError(f"exit_layers contains {layer!r}, which is not an integer.")
    if not layers:
        raise _SpecError(f"exit_layers={spec!r} selects no layer.")
    if len(set(layers)) != len(layers):
        raise _SpecError(f"exit_layers={layers} has duplicates.")
    bad = [k for k in layers if k < 1]
    if bad:
        raise _SpecError(f"exit_layers has {bad}, but layers are counted from 1 (exit k follows the k-th layer).")
    return sorted(layers)


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
        return _parse_syntax(spec)
    except _SpecError as error:
        raise ValueError(
            f"{error} Exits are distinct layer numbers from 1 to the model's depth, e.g. exit_layers='9,12,15' or "
            "the slice '9::3' (every 3rd layer from 9 to the last)."
        ) from None


def parse_exit_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Resolve an ``exit_layers`` setting against a model's depth.

    Args:
        spec: ``None`` (the paper's default, see [`default_exit_layers`]), a list of ints, a comma-separated string
            ``"12,16,20"``, or a ``"start:stop:step"`` slice string over layer numbers (``"12:41:4"`` gives
            12, 16, ..., 40; as in Python, ``stop`` is excluded and may be omitted to mean ``num_layers + 1``).
        num_layers: Decoder depth of the model.

    Returns:
        The exits, sorted ascending.

    Raises:
        ValueError: for non-integers, duplicates, or layers outside ``1..num_layers``, naming the depth and a valid
            example.
    """
    if spec is None:
        return default_exit_layers(num_layers)
    try:
        parsed = _parse_syntax(spec)
    except _SpecError as error:
        raise _invalid(str(error), num_layers) from None
    if isinstance(parsed, slice):
        parsed = list(range(parsed.start, num_layers + 1, parsed.step))
        if not parsed:
            raise _invalid(f"exit_layers={spec!r} selects no layer.", num_layers)
    bad = [k for k in parsed if not 1 <= k <= num_layers]
    if bad:
        raise _invalid(f"exit_layers has {bad} outside 1..{num_layers}.", num_layers)
    return parsed


def record_exit_layers(model: nn.Module, exit_layers: Sequence[int]) -> None:
    """Record the trained exits as ``soft_exit_layers`` in the model config (``save_pretrained`` writes it)."""
    setattr(unwrap_model(model).config, CONFIG_KEY, [int(k) for k in exit_layers])


def recorded_exit_layers(model: nn.Module) -> list[int] | None:
    """The ``soft_exit_layers`` recorded in a model's config, or ``None`` for a model not trained with SoFT."""
    layers = getattr(unwrap_model(model).config, CONFIG_KEY, None)
    return None if layers is None else [int(k) for k in layers]


def _backbone(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    return backbone if isinstance(backbone, nn.Module) else model


def _find_child(module: nn.Module, names: Sequence[str]) -> nn.Module | None:
    for owner in (module, getattr(module, "decoder", None)):
        if not isinstance(owner, nn.Module):
            continue
        for name in names:
            child = getattr(owner, name, None)
            if isinstance(child, nn.Module):
                return child
    return None


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (``model.layers``, ``transformer.h``, ``decoder.layers``, ...)."""
    base = unwrap_model(model)
    layers = _find_child(_backbone(base), _LAYER_NAMES)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"Cannot find the decoder layers of {type(base).__name__}: looked for {_LAYER_NAMES} on its backbone "
            f"`{type(_backbone(base)).__name__}` and its `decoder`."
        )
    return layers


# Set on a model instance once its final norm is identified: the norm's path under the backbone
_FINAL_NORM_CACHE = "_soft_peft_final_norm"
# What PEFT (modules_to_save, tuners), FSDP1 and activation checkpointing wrap a module in, and where the original is
_WRAPPED_MODULE_ATTRIBUTES = ("original_module", "base_layer", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer, possibly inside a PEFT/FSDP/checkpointing wrapper: torch's, or any class named *Norm*."""
    inner = next((getattr(module, a) for a in _WRAPPED_MODULE_ATTRIBUTES if hasattr(module, a)), None)
    if isinstance(inner, nn.Module):
        return _is_norm(inner)
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _norm_candidates(backbone: nn.Module) -> dict[str, nn.Module]:
    """Norm layers held directly by the backbone (or its ``decoder``), so outside the decoder layers, by path."""
    candidates = {}
    for prefix, owner in (("", backbone), ("decoder.", getattr(backbone, "decoder", None))):
        if isinstance(owner, nn.Module):
            candidates.update({prefix + name: child for name, child in owner.named_children() if _is_norm(child)})
    return candidates


def _parameters_unavailable(model: nn.Module) -> bool:
    """Whether parameters are sharded (ZeRO-3, FSDP) or not materialised, so that a check forward cannot run."""
    for parameter in model.parameters():
        if parameter.is_meta or isinstance(parameter, DTensor) or hasattr(parameter, "ds_id"):
            return True
        if getattr(parameter, "_is_flat_param", False):
            return True
    return False


def _norms_giving_last_hidden_state(base: nn.Module, backbone: nn.Module, candidates: dict[str, nn.Module]):
    """Run the backbone on 3 tokens and return the candidates whose output is ``last_hidden_state``."""
    outputs = {}
    hooks = [
        module.register_forward_hook(
            lambda _module, _inputs, output, name=name: outputs.__setitem__(
                name, output[0] if isinstance(output, tuple) else output
            )
        )
        for name, module in candidates.items()
    ]
    embeddings = base.get_input_embeddings().weight  # (V, H)
    input_ids = torch.arange(3, device=embeddings.device).unsqueeze(0) % embeddings.size(0)  # (1, 3)
    try:
        with torch.no_grad():
            last = backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # (1, 3, H)
            projection = _find_child(backbone, ("project_out",))  # OPT projects after its final norm
            if projection is not None:
                outputs = {name: projection(output) for name, output in outputs.items()}
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name, output in outputs.items() if torch.is_tensor(output) and torch.equal(output, last)]


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm of a causal LM: the norm the backbone applies to the last decoder layer's output.

    Found by structure, not by name: the candidates are the norm layers (torch's, or any class named *Norm*) that the
    backbone holds outside its decoder layers. Unless the parameters are sharded (ZeRO-3, FSDP) or on the meta
    device, the candidate is confirmed once by a 3-token forward (its output must be ``last_hidden_state``), which
    also tells several candidates apart (BLOOM's embedding norm and ``ln_f``). The result is cached on the model
    instance as a path, so modules that PEFT or FSDP replace later are still found.

    Args:
        model: A transformers causal LM, possibly wrapped (PEFT, DDP, DeepSpeed).

    Returns:
        The norm module, or ``None`` for models without one by design (OPT with ``do_layer_norm_before=False``).

    Raises:
        ValueError: when no candidate, or no single one, is the final norm; the message names the candidates and
            the ``final_norm=`` argument that fixes it.
    """
    base = unwrap_model(model)
    backbone = _backbone(base)
    cached_path = getattr(base, _FINAL_NORM_CACHE, None)
    if cached_path is not None:
        try:
            return backbone.get_submodule(cached_path)
        except AttributeError:  # the module is gone since: look again
            pass
    candidates = _norm_candidates(backbone)
    fix = (
        "Pass it explicitly, e.g. `SoFTTrainer(..., final_norm=model.model.my_norm)` or "
        "`SortedLossWrapper(model, final_norm=...)`."
    )
    name = type(base).__name__
    if not candidates:
        config = base.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        # OPT with `do_layer_norm_before=False` has no final norm by design: its layers end normed
        if getattr(text_config, "do_layer_norm_before", True) is False:
            return None
        raise ValueError(
            f"Cannot find the final norm of {name}: its backbone `{type(backbone).__name__}` holds no norm layer "
            f"outside its decoder layers. {fix}"
        )
    if _parameters_unavailable(base):
        if len(candidates) > 1:
            raise ValueError(
                f"Cannot tell which of {sorted(candidates)} is the final norm of {name}: its parameters are sharded "
                f"(ZeRO-3/FSDP) or not materialised, so no check forward can run. {fix}"
            )
        (path,) = candidates
    else:
        matches = _norms_giving_last_hidden_state(base, backbone, candidates)
        if len(matches) != 1:
            raise ValueError(
                f"Cannot find the final norm of {name}: of its backbone's norm layers {sorted(candidates)}, "
                f"{'none gives' if not matches else f'{matches} all give'} the backbone's `last_hidden_state`. {fix}"
            )
        (path,) = matches
    setattr(base, _FINAL_NORM_CACHE, path)
    return candidates[path]


@dataclass
class ExitHead:
    """The modules and constants that turn exit hidden states into logits.

    Attributes:
        num_layers: Decoder depth; exit ``num_layers`` is the model's ordinary (already normed) last hidden state.
        final_norm: The model's final norm, or ``None`` for models without one (OPT with post-layer norm).
        output_projection: A projection applied after the norm (OPT's ``project_out``), or ``None``.
        lm_head: The shared output embedding (``model.get_output_embeddings()``).
        final_logit_softcapping: Gemma-2/3 softcap ``c`` (logits become ``c * tanh(logits / c)``), or ``None``.
        logit_scale: Multiplier applied to the logits before softcapping (Cohere ``logit_scale``, Granite
            ``1 / logits_scaling``); ``1.0`` for most models.
    """

    num_layers: int
    final_norm: nn.Module | None
    output_projection: nn.Module | None
    lm_head: nn.Module
    final_logit_softcapping: float | None = None
    logit_scale: float = 1.0

    def normalize(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply the final norm (and projection) to exit ``layer``'s hidden states ``(..., H)``.

        Exit ``num_layers`` must be given ``last_hidden_state``, which is already normed, and is returned as is.
        """
        if layer == self.num_layers:
            return hidden
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.output_projection is not None:
            hidden = self.output_projection(hidden)
        return hidden

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``(..., V)`` of normed hidden states ``(..., H)``, post-processing included."""
        return self.post_process(self.lm_head(normed_hidden))

    def post_process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the model's logit scale and softcap to raw head outputs ``(..., V)`` (or any slice of them)."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


def _logit_post_processing(text_config) -> tuple[float | None, float]:
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)  # Cohere multiplies
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:  # Granite divides
        scale = 1.0 / text_config.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)


def find_exit_head(model: nn.Module, final_norm: nn.Module | None = None) -> ExitHead:
    """Locate the final norm, output projection and shared LM head of a causal LM, generically.

    The head is ``get_output_embeddings()``; the norm is [`find_final_norm`]'s. PEFT, DDP and DeepSpeed wrappers are
    unwrapped. Look-ups are cheap, so callers redo them on each forward: FSDP and PEFT may replace modules after a
    first look.

    Args:
        model: A transformers causal LM, possibly wrapped.
        final_norm: Pass the norm module explicitly where [`find_final_norm`] cannot tell it.

    Raises:
        ValueError: when the head or norm cannot be found, naming the model class and the ``final_norm`` argument.
    """
    base = unwrap_model(model)
    config = base.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    backbone = _backbone(base)
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if lm_head is None or getattr(lm_head, "weight", None) is None:
        raise ValueError(
            f"{type(base).__name__} has no output embedding (`get_output_embeddings()` returned {lm_head!r}), so SoFT "
            "has no shared LM head to apply at each exit. Use a causal LM class (`AutoModelForCausalLM`)."
        )
    projection = None
    if final_norm is None:
        final_norm = find_final_norm(base)
        projection = _find_child(backbone, ("project_out",))
    softcap, scale = _logit_post_processing(text_config)
    return ExitHead(
        num_layers=num_decoder_layers(base),
        final_norm=final_norm,
        output_projection=projection,
        lm_head=lm_head,
        final_logit_softcapping=softcap,
        logit_scale=scale,
    )
