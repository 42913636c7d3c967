"""The quality study's child processes (`python -m benchmarks.quality_study _train|_eval ...`, started by `run`):
training with a per-step timer and the learning-curve snapshots, and the per-exit evaluation of a saved model."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

TRAINING_STATE = ("optimizer", "scheduler", "rng_state", "training_args")


def link_folder(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """Make `target` hold `source`'s files (but those whose names start with `skip`) as hard links (no copy), which
    outlive the source's rotation. Written under a temporary name, so a kill never leaves half a folder; an existing
    `target` is kept as it is."""
    if target.exists():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith(skip):
            os.link(path, partial / path.name)
    partial.rename(target)


def _snapshot(checkpoint: Path, run_dir: Path, step: int) -> None:
    """Keep the model of `checkpoint` (not its training state) as `<run>/curve/step-<step>` for the learning curve."""
    link_folder(checkpoint, run_dir / "curve" / f"step-{step}", skip=TRAINING_STATE)


def _steps(variable: str) -> set[int]:
    return {int(step) for step in os.environ.get(variable, "").split(",") if step}


def train_child(run_dir: str, argv: list[str]) -> int:
    """Child: train with a per-step timer (appended to step_times.jsonl, so it survives an interruption)."""
    from transformers import TrainerCallback

    from soft_peft.cli.train import TrainingInterrupted, train
    from soft_peft.cli.train_args import parse_args

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.first, self.started = True, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record = {"step": state.global_step, "seconds": time.perf_counter() - self.started}
            with open(Path(run_dir) / "step_times.jsonl", "a") as out:
                out.write(json.dumps({**record, "first_in_process": self.first}) + "\n")
            self.first = False

        def on_save(self, args, state, control, **kwargs):
            every = int(os.environ.get("SOFT_PEFT_STUDY_CURVE_EVERY", "0"))
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if every and state.global_step % every == 0:
                _snapshot(checkpoint, Path(run_dir), state.global_step)
            # Whole checkpoints kept past the rotation, for other runs to fork from (`run --fork_from RUN@STEP`)
            if state.global_step in _steps("SOFT_PEFT_STUDY_KEEP_STEPS"):
                link_folder(checkpoint, Path(run_dir) / "kept" / checkpoint.name)
            # Tests interrupt a run here, right after a complete checkpoint, as a kill would
            if state.global_step == int(os.environ.get("SOFT_PEFT_STUDY_STOP_AFTER_SAVE", "-1")):
                os._exit(3)

    try:
        train(*parse_args(argv, prog="quality_study"), callbacks=[StepTimer()])
    except TrainingInterrupted as stopped:  # SIGTERM / Ctrl-C: a checkpoint was saved, the next `run` resumes it
        return stopped.exit_code  # the resume line is already printed
    return 0


def eval_child(model_dir, held_out, rows, max_length, exits, output) -> int:
    """Child: per-exit teacher-forced metrics of the saved model on the first `rows` held-out rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_peft.evaluation.examples import load_eval_dataset, tokenize_examples
    from soft_peft.evaluation.per_exit import evaluate_exits

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, dataset_format = load_eval_dataset(held_out, max_samples=int(rows))
    examples = tokenize_examples(dataset, tokenizer, dataset_format, max_length=int(max_length))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layers = [int(k) for k in exits.split(",")]
    result = evaluate_exits([model], [layers], examples, pad, batch_size=4, progress=False)
    keep = ("loss", "token_accuracy", "agreement_with_last", "kl_to_last")
    per_exit = {str(k): {m: v[m] for m in keep} for k, v in result.metrics[0].items()}
    partial = Path(output).with_name(Path(output).name + ".partial")
    partial.write_text(json.dumps({"eval_rows": len(examples), "eval_tokens": result.num_tokens, "exits": per_exit}))
    partial.rename(output)  # whole or absent: `run` and the curve skip an evaluation whose file exists
    return 0
