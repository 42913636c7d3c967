"""Where a transformers causal LM keeps its parts: the unwrapped model, its backbone, decoder layers and final norm.

Found by structure (``base_model_prefix``, ``get_output_embeddings()``, a check forward), never by hard-coded
attribute paths, and through PEFT, DDP, DeepSpeed and FSDP wrappers. The loss, evaluation and the decoders all look
the model up here; what an exit *computes* from these parts is [`~soft_peft.exit_head.ExitHead`].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig

__all__ = [
    "backbone_outputs",
    "find_backbone",
    "find_final_norm",
    "find_output_projection",
    "get_decoder_layers",
    "num_decoder_layers",
    "unwrap_model",
]

_LAYER_NAMES = ("layers", "h", "blocks", "block")


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


def find_backbone(model: nn.Module) -> nn.Module:
    """The backbone of a causal LM: the module under ``base_model_prefix`` (``model.model``, ``transformer``, ...).

    The one place soft-peft looks it up; the loss wrapper, evaluation and the layer-wise decoders all run it.

    Args:
        model: A transformers causal LM, possibly wrapped (PEFT, DDP, DeepSpeed).

    Returns:
        The backbone module, or the unwrapped model itself when it has no backbone under its prefix (a bare decoder).
    """
    base = unwrap_model(model)
    prefix = getattr(base, "base_model_prefix", "")
    backbone = getattr(base, prefix, None) if prefix else None
    return backbone if isinstance(backbone, nn.Module) else base


def _find_child(module: nn.Module, names: Sequence[str]) -> nn.Module | None:
    for owner in (module, getattr(module, "decoder", None)):
        if not isinstance(owner, nn.Module):
            continue
        for name in names:
            child = getattr(owner, name, None)
            if isinstance(child, nn.Module):
                return child
    return None


def find_output_projection(backbone: nn.Module) -> nn.Module | None:
    """The projection a backbone applies after its final norm (OPT's ``project_out``), or ``None`` (most models)."""
    return _find_child(backbone, ("project_out",))


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (``model.layers``, ``transformer.h``, ``decoder.layers``, ...)."""
    base = unwrap_model(model)
    layers = _find_child(find_backbone(base), _LAYER_NAMES)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"Cannot find the decoder layers of {type(base).__name__}: looked for {_LAYER_NAMES} on its backbone "
            f"`{type(find_backbone(base)).__name__}` and its `decoder`."
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
            last_hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # (1, 3, H)
            projection = find_output_projection(backbone)  # OPT projects after its final norm
            if projection is not None:
                outputs = {name: projection(output) for name, output in outputs.items()}
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name, output in outputs.items() if torch.is_tensor(output) and torch.equal(output, last_hidden)]


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
    backbone = find_backbone(base)
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


def backbone_outputs(model: nn.Module, *args, **kwargs):
    """Run a causal LM's backbone once with every hidden state, for [`~soft_peft.exit_head.ExitHead.exit_state`].

    Args:
        model: A transformers causal LM, possibly wrapped.
        *args: Passed to the backbone (``input_ids``, ...).
        **kwargs: Passed to the backbone; ``output_hidden_states=True`` and ``use_cache=False`` are set.

    Returns:
        The backbone's outputs, with ``last_hidden_state`` and ``num_layers + 1`` ``hidden_states`` (embeddings first).

    Raises:
        ValueError: when the backbone does not return them (it ignores ``output_hidden_states``).
    """
    kwargs.update(output_hidden_states=True, use_cache=False)
    outputs = find_backbone(model)(*args, **kwargs)
    hidden_states = getattr(outputs, "hidden_states", None)
    expected = num_decoder_layers(model) + 1
    if getattr(outputs, "last_hidden_state", None) is None or hidden_states is None or len(hidden_states) != expected:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__}'s backbone returned "
            f"{None if hidden_states is None else len(hidden_states)} hidden states, expected {expected} "
            "(embeddings + one per layer) and a `last_hidden_state`. SoFT needs `output_hidden_states=True` to be "
            "honoured."
        )
    return outputs
