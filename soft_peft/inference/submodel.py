"""A standard transformers model made of a SoFT model's first ``num_layers`` layers, its final norm and its head."""

from __future__ import annotations

import copy as copy_module
import warnings

import torch
from torch import nn

from ..exits import CONFIG_KEY, recorded_exit_layers
from ..model_layout import get_decoder_layers, num_decoder_layers, unwrap_model

# One import path, the top level: `from soft_peft import extract_submodel`
__all__: list[str] = []


def _truncated_config(config, num_layers: int):
    config = copy_module.deepcopy(config)
    text_config = config.get_text_config(decoder=True)
    text_config.num_hidden_layers = num_layers
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        text_config.layer_types = list(layer_types)[:num_layers]
    recorded = getattr(config, CONFIG_KEY, None)
    if recorded is not None:
        setattr(config, CONFIG_KEY, [int(k) for k in recorded if int(k) <= num_layers])
    return config


def _share_children(target: nn.Module, source: nn.Module, layers_source: nn.ModuleList, num_layers: int) -> None:
    """Point every child module of ``target`` at ``source``'s, the decoder layers truncated."""
    for name, child in list(source.named_children()):
        if child is layers_source:
            setattr(target, name, nn.ModuleList(list(layers_source)[:num_layers]))
        elif any(module is layers_source for module in child.modules()):
            _share_children(getattr(target, name), child, layers_source, num_layers)
        else:
            setattr(target, name, child)


def extract_submodel(model: nn.Module, num_layers: int, copy: bool = False) -> nn.Module:
    """The sub-model of the first ``num_layers`` decoder layers, with the parent's final norm and LM head.

    Its ordinary output is exit ``num_layers`` of the parent, so its greedy ``generate`` decodes with that exit.

    Args:
        model: A transformers causal LM (possibly PEFT-wrapped: PEFT layers are shared as they are).
        num_layers: Depth of the sub-model, in ``1..L``. A warning is issued when the checkpoint records SoFT exits
            (``soft_exit_layers``) and ``num_layers`` is not one of them: that prefix was not trained as a sub-model.
        copy: ``False`` shares the parent's parameters (no memory copied; changing one changes the other). ``True``
            returns a standalone model that ``save_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` reload.

    Returns:
        A model of the parent's class with ``config.num_hidden_layers == num_layers`` and ``soft_exit_layers``
        restricted to ``<= num_layers``, in the parent's train/eval mode.

    Raises:
        ValueError: for ``num_layers`` outside ``1..L``, or ``copy=True`` on a PEFT-wrapped model (merge it first).
    """
    base = unwrap_model(model)
    total = num_decoder_layers(base)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"`num_layers` must be an int in 1..{total} (the model's depth), got {num_layers!r}.")
    recorded = recorded_exit_layers(base)
    if recorded is not None and num_layers not in recorded:
        warnings.warn(
            f"num_layers={num_layers} is not one of the exits this checkpoint was trained with ({recorded}); "
            "its sub-model may be poor. Pick one of those.",
            stacklevel=2,
        )
    if copy and base is not model:
        raise ValueError(
            "extract_submodel(copy=True) needs a plain transformers model; merge the adapter first "
            "(`model = model.merge_and_unload()`) so the saved sub-model reloads without PEFT."
        )
    config = _truncated_config(base.config, num_layers)
    # Build the shell on the meta device: every module is then replaced by the parent's, so nothing is allocated
    with torch.device("meta"):
        submodel = type(base)(config)
    _share_children(submodel, base, get_decoder_layers(base), num_layers)
    leftover = [
        name for name, tensor in list(submodel.named_parameters()) + list(submodel.named_buffers()) if tensor.is_meta
    ]
    if leftover:
        raise ValueError(
            f"Could not share {leftover[:3]} of {type(base).__name__} with the sub-model; "
            "use `copy=True` after loading the model normally."
        )
    submodel.generation_config = copy_module.deepcopy(base.generation_config)
    submodel.train(base.training)
    if copy:
        submodel = copy_module.deepcopy(submodel)
    return submodel
