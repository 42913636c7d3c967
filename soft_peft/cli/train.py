"""`soft-peft train --config recipe.yaml [overrides]`: SoFT fine-tuning from a `TrlParser` YAML recipe plus
command-line overrides, the code path of `examples/*.py` too.

Arguments are TRL's own ([`soft_peft.cli.train_args`]): `SoFTScriptArguments` (TRL's `ScriptArguments` plus the
dataset format), [`SoFTConfig`] (TRL's `SFTConfig` plus the exits) and TRL's `ModelConfig` (model, dtype, LoRA). So
every `trl sft` flag works. One process by default; for several, launch it through accelerate:

```bash
soft-peft train --config smollm2_135m_alpaca_cpu --dataset_name data/alpaca.json --max_steps 20
accelerate launch --config_file recipes/accelerate/ddp.yaml -m soft_peft.cli.train --config recipes/<recipe>.yaml
accelerate launch --config_file recipes/accelerate/ddp.yaml examples/alpaca.py \
    --config recipes/smollm2_135m_alpaca_cpu.yaml --max_steps 10 --output_dir runs/smollm2-soft
```
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Sequence

import torch.distributed as dist
from datasets import Dataset
from transformers import TrainerCallback
from trl import ModelConfig, get_peft_config, get_quantization_config

from ..checkpoints import run_schedule
from ..config import SoFTConfig
from ..data import held_out_split, load_trl_dataset
from ..data_rows import DatasetFormatError
from ..exit_weights import exit_loss_weights
from ..exits import exit_layers_as_written
from ..hub import ModelNotFoundError, resolve_model_path
from ..resume import latest_complete_checkpoint, resolve_resume_checkpoint
from ..run_guards import NonFiniteTrainingError, NonFiniteWeightsError
from ..trainer import SoFTTrainer
from ..wrapper import exit_loss_weights_of
from .export_folder import writes_over_model
from .folder_writes import removing_new_files, write_failure
from .lr_schedule import zero_learning_rate_warning
from .output_dir_lock import OutputDirInUse, OutputDirLock, holds_output_dir_lock
from .preflight import (
    UsageError,
    check_exits_against_model,
    check_model_files,
    check_output_dir,
    error_reason,
    warn,
)
from .resume_checks import check_resume_matches
from .stop_on_signal import StopOnSignal
from .train_args import SoFTScriptArguments, make_parser, parse_args

__all__ = ["ShardingReport", "TrainingFailed", "TrainingInterrupted", "end_run", "main", "train"]


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; the message says how to resume.

    Args:
        message: The resume line.
        exit_code: 128 + the signal's number, as a shell reports a process ended by it.
        trainer: The trainer, to end the run with.
    """

    def __init__(self, message: str, exit_code: int, trainer: SoFTTrainer):
        super().__init__(message)
        self.exit_code, self.trainer = exit_code, trainer


class TrainingFailed(Exception):
    """Training stopped on a NaN or infinite loss or gradient norm, without saving a final model.

    Args:
        message: What diverged, when, and what to change.
        trainer: The trainer, to end the run with.
    """

    def __init__(self, message: str, trainer: SoFTTrainer):
        super().__init__(message)
        self.trainer = trainer


def _tokenizer(name_or_path: str | None):
    """The tokenizer given by `--tokenizer_name_or_path`, or `None` for the model's own (loaded by `SFTTrainer`)."""
    if name_or_path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        reason = error_reason(error)
        raise UsageError(f"--tokenizer_name_or_path {name_or_path}: cannot load a tokenizer ({reason}).") from None


def _load_datasets(script_args: SoFTScriptArguments, training_args: SoFTConfig):
    name, fmt = script_args.dataset_name, script_args.dataset_format
    train_dataset, fmt = load_trl_dataset(name, fmt, script_args.dataset_train_split, script_args.dataset_config)
    if training_args.eval_strategy == "no":
        return train_dataset, None
    if script_args.eval_holdout_size > 0:
        size = script_args.eval_holdout_size
        return held_out_split(train_dataset, int(size) if size >= 1 else size, seed=training_args.seed)
    if os.path.exists(name):
        raise UsageError(
            f"evaluation is on but {name} is local data with one split: set --eval_holdout_size (e.g. 0.05) to "
            "hold out rows for it."
        )
    return train_dataset, load_trl_dataset(name, fmt, script_args.dataset_test_split, script_args.dataset_config)[0]


def _check_rows_survived_truncation(trainer: SoFTTrainer, split: str, rows) -> None:
    """Refuse, with the numbers, a dataset whose every row lost its completion to `max_length` truncation.

    `SFTTrainer` drops rows left without a completion token, so such a dataset would otherwise end in a bare
    `num_samples=0` error from the sampler.
    """
    prepared = trainer.train_dataset if split == "train" else trainer.eval_dataset
    if rows is None or not isinstance(prepared, Dataset) or len(prepared) > 0:
        return
    args = trainer.args
    detail, fix = "", "Raise --max_length or shorten the rows."
    if "prompt" in rows.column_names and isinstance(rows[0]["prompt"], str):  # prompt-completion text
        shortest = min(len(trainer.processing_class(prompt)["input_ids"]) for prompt in rows["prompt"])
        detail = f"; the shortest prompt alone is {shortest} tokens"
        fix = f"Raise --max_length (above {shortest}) or shorten the rows."
    raise UsageError(
        f"every one of the {len(rows)} {split} rows is longer than --max_length {args.max_length} and keeps no "
        f"completion token after truncation (truncation_mode {args.truncation_mode}{detail}). {fix}"
    )


class ShardingReport(TrainerCallback):
    """Prints, once per rank when training starts, how much of the model this rank stores.

    `shard` counts the elements of this rank's partition: `param.ds_tensor` under ZeRO-3 (of `param.ds_numel`), the
    local tensor of a `DTensor` under FSDP2, the whole parameter otherwise. `materialized` counts elements present as
    full tensors outside forward (ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` whole).
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        shard = full = materialized = 0
        for param in model.parameters():
            if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3
                shard, full = shard + param.ds_tensor.numel(), full + param.ds_numel
                materialized += param.data.numel()
            elif hasattr(param, "to_local"):  # FSDP2 DTensor
                shard, full = shard + param.to_local().numel(), full + param.numel()
                materialized += param.to_local().numel()
            else:
                shard, full, materialized = shard + param.numel(), full + param.numel(), materialized + param.numel()
        rank, share = int(os.environ.get("RANK", "0")), 100.0 * shard / max(full, 1)
        print(
            f"[soft-peft] rank {rank}: shard {shard} of {full} parameter elements ({share:.1f}%), "
            f"materialized {materialized}",
            flush=True,
        )


def train(
    script_args: SoFTScriptArguments,
    training_args: SoFTConfig,
    model_args: ModelConfig,
    callbacks: list[TrainerCallback] | None = None,
) -> SoFTTrainer:
    """Fine-tune `model_args.model_name_or_path` with SoFT and save the final model to `training_args.output_dir`.

    The saved model is a vanilla transformers checkpoint (or a PEFT adapter with `--use_peft`) with
    `soft_exit_layers` in its config, gathered from all ranks under ZeRO-3 / FSDP; `trainer_state.json` beside it
    holds the log history with `exit_{k}/loss` and `exit_{k}/mean_token_accuracy`.

    Before any weight is loaded or any row tokenized, the exits and their weights are checked against the depth in
    the model's config, the output folder is checked (writable, and holding no previous run unless
    `--overwrite_output_dir` or `--resume_from_checkpoint`), `--resume_from_checkpoint` is resolved to a complete
    checkpoint (alone or `true`: the latest one that has its `trainer_state.json`) and checked against this run (the
    model's shape; its base model, exits, weights, exit schedule, layer dropout and, with an anneal, its length
    unless `--allow_resume_changes`). The run's main process holds a lock on `--output_dir` until it returns, so a
    second run on the same folder refuses, naming it.

    SIGTERM and SIGINT during training save a `checkpoint-N` at the end of the current optimizer step
    ([`StopOnSignal`]) and raise [`TrainingInterrupted`] with the resume line, instead of saving a final model.

    Returns:
        The trainer, after training and saving. End it with `trainer.end()` once nothing else needs the other
        processes (as `Trainer.end` says); [`main`] does.

    Raises:
        UsageError: for any of the checks above, and for a model with NaN or infinite weights (found once loaded).
        TrainingInterrupted: when a signal stopped training (after its checkpoint is saved).
        TrainingFailed: when the loss or gradient norm turned NaN or infinite (no final model is saved).
    """
    # A missing folder or an unreachable Hub fails here in one line, not after ~30 s of connection retries
    try:
        model_name_or_path = resolve_model_path(model_args.model_name_or_path, model_args.model_revision)
    except ModelNotFoundError as error:
        raise UsageError(f"--model_name_or_path {error}") from None
    # Everything a wrong setting would only show after the weights load and the data is tokenized, checked first
    layers = check_exits_against_model(
        model_name_or_path,
        training_args.exit_layers,
        training_args.exit_loss_weights,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    try:
        check_model_files(model_name_or_path, script_args.tokenizer_name_or_path)
    except ValueError as error:
        raise UsageError(f"--model_name_or_path {error}") from None
    # The final save would write over the model being read (`--overwrite_output_dir`): the same check as extract's.
    # A LoRA adapter folder is no model to train from (its config is refused above), so it has no base to guard here
    reason = writes_over_model(training_args.output_dir, [model_name_or_path])
    if reason:
        raise UsageError(reason)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per launch, not one per process
        warn("soft-peft train", zero_learning_rate_warning(training_args))
    try:
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not holds_output_dir_lock(training_args.save_on_each_node):  # the run's main process locks for every rank
        _check_before_loading(script_args, training_args, model_args, model_name_or_path, layers, resume)
        return _train(script_args, training_args, model_args, model_name_or_path, resume, callbacks)
    # Writable first (`overwrite=True` skips only the previous-run check), so the lock can be created there
    check_output_dir(training_args.output_dir, overwrite=True)
    try:
        lock = OutputDirLock(training_args.output_dir).acquire()
    except OutputDirInUse as error:
        raise UsageError(str(error)) from None
    with lock:  # a second run on this folder now refuses, naming this one, instead of overwriting it
        _check_before_loading(script_args, training_args, model_args, model_name_or_path, layers, resume)
        return _train(script_args, training_args, model_args, model_name_or_path, resume, callbacks)


def _check_before_loading(script_args, training_args, model_args, model_name_or_path, layers, resume) -> None:
    check_output_dir(training_args.output_dir, script_args.overwrite_output_dir, resuming=resume is not None)
    if resume is not None:
        check_resume_matches(
            resume,
            model_name_or_path,
            layers,
            # As the trainer weighs them: explicit weights follow the exits in the order written
            exit_loss_weights(
                training_args.exit_loss_weights,
                layers,
                written_order=exit_layers_as_written(training_args.exit_layers, max(layers)),
            ),
            allow_changes=script_args.allow_resume_changes,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            schedule=run_schedule(training_args, training_args.max_steps, training_args.num_train_epochs),
        )


def _train(script_args, training_args, model_args, model_name_or_path, resume, callbacks) -> SoFTTrainer:
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    train_dataset, eval_dataset = _load_datasets(script_args, training_args)
    stop = StopOnSignal()
    try:
        trainer = SoFTTrainer(
            model=model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=[ShardingReport(), *(callbacks or []), stop],
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
            processing_class=_tokenizer(script_args.tokenizer_name_or_path),
        )
    except NonFiniteWeightsError as error:  # found once loaded: the weights' values are not in any header
        raise UsageError(f"--model_name_or_path {error}") from None
    _check_rows_survived_truncation(trainer, "train", train_dataset)
    _check_rows_survived_truncation(trainer, "eval", eval_dataset)
    weights = ", ".join(f"{layer}: {weight:.4g}" for layer, weight in exit_loss_weights_of(trainer.model).items())
    trainer.accelerator.print(f"[soft-peft] exit loss weights ({training_args.exit_loss_weights}): {weights}")
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteTrainingError as error:  # no final save: it would hold NaN weights
        raise TrainingFailed(str(error), trainer) from None
    except Exception as error:  # a checkpoint that did not fit on the disk ends the run in one line, saying so
        _refuse_write_failure(error, training_args.output_dir, f"at step {trainer.state.global_step}")
        raise
    finally:
        stop.restore_handlers()
    if stop.signal_name is not None:  # a checkpoint, not a final model: the run is not finished
        hint = stop.resume_hint(trainer.state.max_steps)
        if trainer.accelerator.is_main_process:
            print(hint, file=sys.stderr, flush=True)
        raise TrainingInterrupted(hint, stop.exit_code, trainer)
    try:
        # A save cut off half way leaves no config.json beside truncated weights (a model that looks finished)
        with removing_new_files(training_args.output_dir):
            trainer.save_model(training_args.output_dir)
            trainer.save_state()
            # The card (TRL's, with the SoFT section) beside the final model too, not only in checkpoints and pushes
            trainer.create_model_card(model_name=os.path.basename(os.path.normpath(training_args.output_dir)))
    except Exception as error:
        _refuse_write_failure(error, training_args.output_dir, "while saving the final model (its files removed)")
        raise
    trainer.accelerator.print(f"[soft-peft] exits {trainer.exit_layers}; model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def _refuse_write_failure(error: Exception, output_dir: str, when: str) -> None:
    """Raise `UsageError` for a write into ``output_dir`` that failed for lack of space or permission, naming the fix
    and the checkpoint to resume from; return for any other error, which the caller re-raises."""
    failure = write_failure(error)
    if failure is None:
        return
    reason, full = failure
    latest, _ = latest_complete_checkpoint(output_dir)
    then = f"then resume with --resume_from_checkpoint {latest}" if latest else "then run again"
    fix = "Free space on its disk" if full else "Fix its permissions"
    raise UsageError(
        f"--output_dir {output_dir}: {reason} {when}. {fix} or choose another --output_dir, {then}."
    ) from None


def end_run(trainer: SoFTTrainer, exit_code: int = 0) -> None:
    """Finish the trackers and destroy the process group (`trainer.end()`); after a gloo run, also end the process
    (with `exit_code`).

    Why the process ends here: gloo's worker threads outlive `destroy_process_group` (DeepSpeed's parameters still
    hold the groups), and tearing them down during interpreter finalization can abort a run that trained and saved
    (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291). Seen once in CI with ZeRO-3
    on 2 CPU processes. So the exit handlers (trackers, logging) run now, while the interpreter is whole, and the
    process exits with `exit_code` without finalizing. Runs without gloo (NCCL, one process) return normally.
    """
    uses_gloo = dist.is_available() and dist.is_initialized() and "gloo" in str(dist.get_backend())
    trainer.end()
    if uses_gloo:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def main(argv: Sequence[str] | None = None, prog: str = "soft-peft train", **defaults) -> int:
    """Parse, train, save and end the run ([`end_run`]); user errors (flags, recipe, data) print one line and return 2;
    a run stopped by SIGTERM/SIGINT saves a checkpoint, prints how to resume and returns 128 + the signal number; a
    run whose loss or gradient norm turned NaN or infinite prints one line and returns 1.

    Args:
        argv: Arguments (default `sys.argv[1:]`).
        prog: Program name for messages (an example script passes its own).
        **defaults: Defaults for the parser (see [`make_parser`]).
    """
    try:
        if any(arg in ("-h", "--help") for arg in (argv if argv is not None else sys.argv[1:])):
            make_parser(prog, **defaults).print_help()
            return 0
        trainer = train(*parse_args(argv, prog, **defaults))
    except (UsageError, DatasetFormatError) as error:
        # Every process of a launch finds the same error: one line is enough (the others exit with the same code)
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as interrupted:
        end_run(interrupted.trainer, interrupted.exit_code)
        return interrupted.exit_code
    except TrainingFailed as failed:  # every rank stops at the same step, on the same gathered values
        if failed.trainer.is_world_process_zero():
            print(f"\n{prog}: error: {failed}", file=sys.stderr, flush=True)  # below the progress bar it stopped
        end_run(failed.trainer, 1)
        return 1
    end_run(trainer)
    return 0


if __name__ == "__main__":  # `accelerate launch -m soft_peft.cli.train ...`
    sys.exit(main())
