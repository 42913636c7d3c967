"""The checks every command runs before it loads weights or tokenizes data, so a wrong setting costs seconds, not the
run: the model's config (depth, context length, trained exits), its files, the exits asked for, and for training the
output folder and the checkpoint to resume.

Kept free of torch imports at module level, like the argument parsers that use it (`soft-peft --help` stays fast).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from ..resume import TRAINER_STATE_NAME
from .folder_writes import nearest_existing, unwritable_reason
from .model_files import check_tokenizer_files, check_weight_files

__all__ = [
    "ModelFacts",
    "UsageError",
    "check_exits_against_model",
    "check_model_files",
    "check_output_dir",
    "error_reason",
    "finished_run_files",
    "not_a_causal_lm",
    "read_model_facts",
    "untrained_exit_warning",
    "warn",
]

# What `save_model` / `save_state` leave in `output_dir` at the end of a run (full model, sharded, or PEFT adapter)
_FINISHED_RUN_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_config.json",
    "adapter_model.safetensors",
    TRAINER_STATE_NAME,
)
_CONFIG_KEY = "soft_exit_layers"  # soft_peft.exits.CONFIG_KEY, without importing torch


class UsageError(Exception):
    """A user error in the arguments or the data: reported as one line, exit code 2."""


def error_reason(error: BaseException) -> str:
    """The first line of an exception's message (library errors run on for pages), or its type's name when empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refuse_remote_code(name_or_path: str, source: str, revision: str | None) -> None:
    """Refuse a config that only the model's own code can read, as transformers decides it (`auto_map` names an
    `AutoConfig` and `model_type` is none of its own); a known `model_type` loads with transformers' code."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    auto_map = config_dict.get("auto_map") or {}
    model_type = config_dict.get("model_type")
    if "AutoConfig" not in auto_map or model_type in CONFIG_MAPPING:
        return
    raise ValueError(
        f"--model_name_or_path {name_or_path}: its config.json asks to run the model's own code (auto_map "
        f"{auto_map['AutoConfig']}; model_type {model_type!r} is not in this transformers), and soft-peft does not "
        "run remote code. Use a model whose architecture transformers implements (a newer transformers may add it)."
    )


def _read_config(name_or_path: str, source: str | None = None, **kwargs):
    """``AutoConfig.from_pretrained(source or name_or_path, **kwargs)``, ``trust_remote_code=False`` unless given; a
    ``ValueError`` naming ``name_or_path``, in one line also for a model that needs remote code (which transformers
    refuses in a paragraph, or, not told ``trust_remote_code``, asks about with a ``[y/N]`` prompt)."""
    from transformers import AutoConfig

    source = source or name_or_path
    try:
        if kwargs.get("trust_remote_code"):  # `soft-peft train --trust_remote_code true`: refused before it runs too
            _refuse_remote_code(name_or_path, source, kwargs.get("revision"))
        return AutoConfig.from_pretrained(source, **{"trust_remote_code": False, **kwargs})
    except OSError as error:
        reason = error_reason(error)
        raise ValueError(f"--model_name_or_path {name_or_path}: cannot read its config.json ({reason})") from None
    except ValueError:
        _refuse_remote_code(name_or_path, source, kwargs.get("revision"))
        raise


# Configs with an `is_decoder` field (False by default) whose causal LM is causal all the same: GPT-NeoX does not read
# it, TrOCR's causal LM sets it. In every other config that has it (BERT, RoBERTa, ELECTRA, ...) False means
# bidirectional attention, and transformers' `*ForCausalLM` of those models predicts from the tokens after too
_CAUSAL_DESPITE_IS_DECODER = ("gpt_neox", "gpt_neox_japanese", "trocr")


def not_a_causal_lm(config) -> str | None:
    """Why a model's config is no decoder-only causal LM (an encoder-decoder, or an encoder-only model), else ``None``.

    Read from the config alone, so every command refuses such a model before its weights load.
    """
    needs = "SoFT needs a decoder-only causal LM (e.g. Llama, Qwen, SmolLM2), whose every prefix of layers is a model."
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"a {name} is an encoder-decoder model; {needs}"
    if getattr(config, "is_decoder", None) is False and config.model_type not in _CAUSAL_DESPITE_IS_DECODER:
        kind = f" ({', '.join(config.architectures)})" if getattr(config, "architectures", None) else ""
        return (
            f"a {name}{kind} is an encoder-only model: its attention sees the whole text (its config's is_decoder "
            f"is false), so it cannot generate text left to right; {needs}"
        )
    return None


def check_exits_against_model(
    model_name_or_path: str,
    exit_layers,
    weights_spec,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> list[int]:
    """Resolve ``exit_layers`` and ``exit_loss_weights`` against the depth in the model's config (no weights loaded).

    Args:
        model_name_or_path: Model folder or Hub name.
        exit_layers: The ``exit_layers`` setting (``None``, a list or a string).
        weights_spec: The ``exit_loss_weights`` setting.
        revision, trust_remote_code: As for ``AutoConfig.from_pretrained``.

    Returns:
        The exits, ascending.

    Raises:
        UsageError: when the config cannot be read, the model is no decoder-only causal LM, or the exits or weights
            do not fit the model, naming its depth and a valid example.
    """
    from ..exit_weights import exit_loss_weights
    from ..exits import parse_exit_layers
    from ..model_layout import num_decoder_layers

    try:
        config = _read_config(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UsageError(str(error)) from None
    reason = not_a_causal_lm(config)
    if reason:
        raise UsageError(f"--model_name_or_path {model_name_or_path}: {reason}")
    try:
        layers = parse_exit_layers(exit_layers, num_decoder_layers(config))
        exit_loss_weights(weights_spec, layers)
    except ValueError as error:
        raise UsageError(f"{model_name_or_path}: {error}") from error
    return layers


def check_model_files(
    model_name_or_path: str,
    tokenizer_name_or_path: str | None = None,
    tokenizer_flag: str | None = "--tokenizer_name_or_path",
) -> None:
    """Refuse a local model folder with a truncated or unreadable weights file, or without a tokenizer when none is
    passed (``tokenizer_name_or_path``); a Hub model is not checked.

    Args:
        model_name_or_path: The model's folder or Hub name.
        tokenizer_name_or_path: A tokenizer given apart from the model; ``None``: the model folder must hold one.
        tokenizer_flag: The option that passes a tokenizer, for the message; ``None`` where the command has none.

    Raises:
        ValueError: naming the file, or saying the folder has no tokenizer and how to give one.
    """
    check_weight_files(model_name_or_path)
    if tokenizer_name_or_path is None:
        check_tokenizer_files(model_name_or_path, tokenizer_flag)


def finished_run_files(output_dir: str) -> list[str]:
    """The files and checkpoint folders in ``output_dir`` that a training run leaves behind (empty if none)."""
    if not os.path.isdir(output_dir):
        return []
    from transformers.trainer_utils import sort_checkpoints

    found = [name for name in _FINISHED_RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    return found + [os.path.basename(path) for path in sort_checkpoints(output_dir)]


def check_output_dir(output_dir: str, overwrite: bool = False, resuming: bool = False) -> None:
    """Refuse an ``output_dir`` the final save could not write, or one holding a previous run.

    Args:
        output_dir: The training output folder (need not exist yet).
        overwrite: Allow an ``output_dir`` that holds a previous run (``--overwrite_output_dir``).
        resuming: A resumed run writes into its own earlier run, so the previous run is expected.

    Raises:
        UsageError: for a folder that is a file, is not writable (or whose nearest existing parent is not), or holds
            a previous run while neither ``overwrite`` nor ``resuming`` is set.
    """
    existing = nearest_existing(output_dir)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir {output_dir}: {existing} is a file, not a folder; choose another folder.")
    problem = unwritable_reason(existing)
    if problem:
        where = "it" if existing == os.path.abspath(output_dir) else f"its parent {existing}"
        raise UsageError(
            f"--output_dir {output_dir}: {where} is not writable ({problem}), so nothing could be saved; choose "
            "another --output_dir or fix its permissions."
        )
    previous = finished_run_files(output_dir)
    if previous and not (overwrite or resuming):
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise UsageError(
            f"--output_dir {output_dir} already holds a run ({shown}): pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint to continue it, or choose another --output_dir."
        )


@dataclass
class ModelFacts:
    """What a checkpoint's config says about it.

    Attributes:
        name: The model's folder or Hub name, as given.
        num_layers: Decoder depth.
        max_positions: Context length (``max_position_embeddings``), or ``None`` when the config has none.
        recorded_exits: The ``soft_exit_layers`` it was trained with, or ``None`` (not trained with SoFT).
        config: The config itself.
    """

    name: str
    num_layers: int
    max_positions: int | None
    recorded_exits: list[int] | None
    config: object = None


def _adapter_base_model(adapter: str, base: str) -> str:
    """The base model an adapter names, if it is a local folder or obtainable from the Hub; else a ``ValueError``.

    A base folder that has moved or been deleted otherwise fails as a malformed Hub repository id.
    """
    from ..hub import ModelNotFoundError, resolve_model_path

    try:
        return resolve_model_path(base)
    except ModelNotFoundError as error:
        raise ValueError(
            f"--model_name_or_path {adapter} is a PEFT adapter whose base model cannot be found: "
            f"{error_reason(error)} Its adapter_config.json names it (base_model_name_or_path): put the base model "
            f"back at {base}, or set base_model_name_or_path there to the base model's folder or Hub id."
        ) from None


def read_model_facts(name_or_path: str) -> ModelFacts:
    """Read a model's [`ModelFacts`] from its ``config.json`` (a PEFT adapter folder: its base model's config).

    Raises:
        ValueError: when no config can be read, it is no decoder-only causal LM ([`not_a_causal_lm`]), it needs
            the model's own (remote) code, an adapter's base model cannot be found, or it has no usable depth, naming
            the model.
    """
    source, adapter_exits = name_or_path, None
    adapter_config = os.path.join(name_or_path, "adapter_config.json")
    if not os.path.isfile(os.path.join(name_or_path, "config.json")) and os.path.isfile(adapter_config):
        from ..checkpoints import read_adapter_exit_layers

        with open(adapter_config, encoding="utf-8") as handle:
            source = json.load(handle).get("base_model_name_or_path") or name_or_path
        source = _adapter_base_model(name_or_path, source) if source != name_or_path else source
        # An adapter's exits are recorded beside it (`soft_peft_config.json`), not in its base model's config
        adapter_exits = read_adapter_exit_layers(name_or_path)
    config = _read_config(name_or_path, source)
    reason = not_a_causal_lm(config)
    if reason:
        raise ValueError(f"{name_or_path}: {reason}")
    text_config = config.get_text_config()
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{name_or_path}: its config has no usable `num_hidden_layers` ({num_layers!r}).")
    if adapter_exits is not None:  # the base model's config, as `load_causal_lm` will give it the adapter's exits
        setattr(config, _CONFIG_KEY, adapter_exits)
    recorded = getattr(config, _CONFIG_KEY, None)
    max_positions = getattr(text_config, "max_position_embeddings", None)
    return ModelFacts(
        name=name_or_path,
        num_layers=num_layers,
        max_positions=max_positions if isinstance(max_positions, int) else None,
        recorded_exits=None if recorded is None else [int(k) for k in recorded],
        config=config,
    )


def untrained_exit_warning(facts: ModelFacts, exits: list[int], flag: str) -> str | None:
    """The warning for decoding with exits below the last layer that the checkpoint did not train, else ``None``.

    As ``extract_submodel`` warns: an exit that is not one of the recorded ``soft_exit_layers``, or any early exit of
    a model without them (``soft-peft eval`` refuses such a model unless ``--exits`` is given).

    Args:
        facts: The model's facts.
        exits: The exits the command will use.
        flag: The flag that chose them, for the message.
    """
    early = [k for k in exits if k < facts.num_layers]
    if not early:
        return None
    if facts.recorded_exits is None:
        return (
            f"{facts.name} records no trained exits (no `{_CONFIG_KEY}` in its config.json: not trained with "
            f"SoFTTrainer), so {flag} {','.join(map(str, early))} decodes with an untrained sub-model; expect poor "
            "output and few accepted drafts."
        )
    untrained = [k for k in early if k not in facts.recorded_exits]
    if untrained:
        return (
            f"{flag} {','.join(map(str, untrained))} is not one of the exits {facts.name} was trained with "
            f"({facts.recorded_exits}); its sub-model may be poor. Pick one of those."
        )
    return None


def warn(prog: str, message: str | None) -> None:
    """Print ``prog: warning: message`` on stderr (nothing for ``None``)."""
    if message:
        print(f"{prog}: warning: {message}", file=sys.stderr)
