"""The arguments of `soft-peft train` and `examples/*.py`: TRL's `TrlParser` over [`SoFTScriptArguments`],
[`SoFTConfig`] and TRL's `ModelConfig`, reading a YAML recipe (`--config`, a file or a shipped recipe's name) plus
command-line overrides, which win.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from transformers.utils import is_torch_bf16_gpu_available
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from ..config import SoFTConfig
from ..prompt_templates import DATASET_FORMATS
from ..settings import SoFTSettings
from .preflight import UsageError, error_reason
from .recipes import resolve_config

__all__ = ["DEFAULT_MODEL", "SoFTScriptArguments", "check_launch_fits_machine", "make_parser", "parse_args"]

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"


@dataclass
class SoFTScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` (`dataset_name`, `dataset_config`, `dataset_train_split`, ...) plus:

    Args:
        dataset_format (`str`, defaults to `"auto"`): The rows' format (`soft_peft.data.DATASET_FORMATS`): TRL's
            `messages`, `prompt_completion` or `text`, trained as `SFTTrainer` trains them; the paper's `alpaca`
            (`instruction`, `input`, `output`; Alpaca template), `gsm8k` or `triviaqa` (`question`, `answer`),
            converted to prompt-completion; or `auto`, told by the columns.
        eval_holdout_size (`float`, defaults to `0`): Rows of the training data held out for evaluation when
            `eval_strategy` is not `"no"`: a fraction below 1 or a count. 0 uses `dataset_test_split` instead.
        overwrite_output_dir (`bool`, defaults to `False`): Train into an `output_dir` that holds a previous run
            (its model, `trainer_state.json` or checkpoints), which is otherwise refused.
        allow_resume_changes (`bool`, defaults to `False`): Resume a checkpoint with another base model, exit set,
            exit weights, exit schedule, layer dropout or (with an anneal) `max_steps` / `num_train_epochs` than it
            was trained with (otherwise refused, naming both values); each change is printed.
    """

    dataset_format: str = field(
        default="auto",
        metadata={"help": "Row format of the dataset ('auto': told by its columns).", "choices": [*DATASET_FORMATS]},
    )
    eval_holdout_size: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this many training rows (a fraction below 1, or a count) for evaluation. "
            "0: evaluate on `dataset_test_split`."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that holds a previous run (refused otherwise)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The tokenizer's folder or Hub name, when the model folder has none (default: the model's)."
        },
    )
    allow_resume_changes: bool = field(
        default=False,
        metadata={
            "help": "Resume with another --model_name_or_path, --exit_layers, --exit_loss_weights, exit schedule, "
            "layer dropout or (with an anneal) run length than the checkpoint was trained with (refused otherwise)."
        },
    )


USAGE = "{prog} [--config NAME|FILE] [--FLAG VALUE ...]"
DESCRIPTION = """Fine-tune a causal LM with Sorted Fine-Tuning (SoFT): TRL's SFT with every listed exit trained.

--config NAME|FILE  A training recipe: a shipped recipe's name (`soft-peft recipes list` lists them) or a YAML
                    file of the flags below (`soft-peft recipes copy NAME` copies one to edit). Flags on the
                    command line override the recipe.

Example: soft-peft train --config smollm2_135m_alpaca_cpu --output_dir runs/soft --max_steps 20

The SoFT settings come first, then soft-peft's run options, then the flags of `trl sft` (TRL's SFTConfig,
transformers' TrainingArguments and TRL's ModelConfig).
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its lines are laid out), each flag's default shown as HfArgumentParser shows it."""


def _soft_flags_first(parser: TrlParser) -> None:
    """Move the SoFT settings and soft-peft's own run options out of argparse's one list of ~300 flags, into headed
    groups shown first by `--help`; the rest keeps argparse's group, headed as TRL's."""
    trl_names = {f.name for f in fields(SFTConfig)} | {f.name for f in fields(ScriptArguments)}
    own = {
        "SoFT settings (SoFTConfig; docs/guide.md, Settings)": [f.name for f in fields(SoFTSettings)],
        "soft-peft run options": [f.name for f in fields(SoFTScriptArguments)],
    }
    rest = parser._optionals  # argparse's own group of optional arguments
    for position, (title, names) in enumerate(own.items()):
        group = parser.add_argument_group(title)
        for action in [action for action in rest._group_actions if action.dest in names]:
            if action.dest not in trl_names:
                rest._group_actions.remove(action)
                group._group_actions.append(action)
        parser._action_groups.remove(group)
        parser._action_groups.insert(position, group)
    rest.title = "TRL and transformers options (as `trl sft`)"


class _OneLineErrorParser(TrlParser):
    # argparse prints the whole usage (hundreds of TrainingArguments flags) before an error: raise one line instead
    def error(self, message):
        raise UsageError(message)


def _deepspeed_launch_without_gpu() -> bool:
    """Whether `accelerate launch` started this process with a DeepSpeed config on a machine without a GPU."""
    import torch

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available()


def check_launch_fits_machine() -> None:
    """Refuse a DeepSpeed launch config made for GPUs (mixed precision) on a machine without one, naming the CPU
    config, before DeepSpeed fails on it with a long traceback.

    Raises:
        UsageError: for such a launch.
    """
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if _deepspeed_launch_without_gpu() and precision != "no":
        raise UsageError(
            f"this DeepSpeed launch config asks for {precision} mixed precision on GPUs, and this machine has none: "
            'on CPUs launch with --config_file "$(soft-peft recipes path accelerate/zero3_cpu)".'
        )


def make_parser(prog: str | None = None, **defaults) -> TrlParser:
    """The `TrlParser` over (`SoFTScriptArguments`, `SoFTConfig`, `ModelConfig`).

    Args:
        prog: Program name shown by `--help`.
        **defaults: Default values that a recipe (`--config`) or the command line override, e.g. an example's
            `dataset_name` and `dataset_format`.
    """
    parser = _OneLineErrorParser(
        (SoFTScriptArguments, SoFTConfig, ModelConfig),
        prog=prog,
        usage=USAGE.format(prog=prog or "soft-peft train"),
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    _soft_flags_first(parser)
    for action in parser._actions:
        # argparse %-formats help strings: a bare "30% depth" would crash `--help`
        if action.help:
            action.help = re.sub(r"(?<!%)%(?![(%])", "%%", action.help)
        if action.dest == "resume_from_checkpoint":
            # `--resume_from_checkpoint` alone means the latest complete checkpoint, as `resume_from_checkpoint=True`
            action.nargs, action.const = "?", "true"
            action.help = (
                "Resume from this checkpoint folder; alone (or 'true'): from the latest complete checkpoint in "
                "--output_dir."
            )
    # SFTConfig turns bf16 on by default, which stops a CPU-only machine before it starts
    # A command-line run that diverged must not end in success (a Python script keeps SFTTrainer's "warn")
    base_defaults = {"model_name_or_path": DEFAULT_MODEL, "on_nonfinite_loss": "stop"}
    if not is_torch_bf16_gpu_available():
        base_defaults["bf16"] = False
    if _deepspeed_launch_without_gpu():  # DeepSpeed on CPUs forms no process group without gloo (zero3_cpu.yaml)
        base_defaults["ddp_backend"] = "gloo"
    parser.set_defaults(**{**base_defaults, **defaults})
    return parser


def parse_args(
    argv: Sequence[str] | None = None, prog: str | None = None, **defaults
) -> tuple[SoFTScriptArguments, SoFTConfig, ModelConfig]:
    """Parse `--config recipe.yaml` and command-line overrides (which win).

    Raises:
        UsageError: for unknown flags or recipe keys, a missing recipe file, or an invalid value.
    """
    check_launch_fits_machine()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("--config expects a YAML recipe file or the name of a shipped recipe, got nothing.")
        try:  # a file as given, else a recipe shipped with soft-peft (`--config smollm2_135m_alpaca_cpu`)
            argv[index + 1] = resolve_config(argv[index + 1])
        except FileNotFoundError as error:
            raise UsageError(str(error)) from error
    parser = make_parser(prog, **defaults)
    try:
        *parsed, from_recipe, from_command_line = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as error:  # raised by the configs' validation (`__post_init__`)
        raise UsageError(error_reason(error)) from error
    if from_command_line:
        raise UsageError(f"unknown option(s) {' '.join(from_command_line)}; see --help for the accepted flags.")
    if from_recipe:
        keys = [arg[2:] for arg in from_recipe[::2]]
        raise UsageError(f"unknown key(s) {keys} in the --config recipe; remove them or check their spelling.")
    script_args, training_args, model_args = parsed
    if not script_args.dataset_name:
        raise UsageError("no dataset: pass --dataset_name (a Hub dataset or a local JSON/JSONL file).")
    return script_args, training_args, model_args
