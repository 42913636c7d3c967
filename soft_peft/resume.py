"""Which checkpoint a run resumes from: the newest *complete* one, for the command line and `SoFTTrainer` alike.

`Trainer.train(resume_from_checkpoint=True)` takes the newest ``checkpoint-N`` even when a kill cut it off before its
``trainer_state.json`` (written last) was saved, and then fails; [`resolve_resume_checkpoint`] skips such a checkpoint
and says so. No torch import here: the command line resolves the checkpoint before anything heavy loads.
"""

from __future__ import annotations

import os

__all__ = ["TRAINER_STATE_NAME", "latest_complete_checkpoint", "resolve_resume_checkpoint"]

# Written last by `Trainer._save_checkpoint`: a checkpoint folder without it was cut off while saving
TRAINER_STATE_NAME = "trainer_state.json"
_RESUME_LATEST = ("true", "yes", "1")
_RESUME_NONE = ("", "false", "no", "0", "none")


def latest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that has its ``trainer_state.json``.

    Unlike ``transformers.trainer_utils.get_last_checkpoint``, a checkpoint cut off while saving (killed before its
    ``trainer_state.json`` was written) is skipped.

    Returns:
        ``(path or None, incomplete)``: the checkpoint to resume from, and the newer incomplete ones it skipped.
    """
    from transformers.trainer_utils import sort_checkpoints

    incomplete = []
    for path in reversed(sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []):
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path, incomplete
        incomplete.append(path)
    return None, incomplete


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """Turn a ``--resume_from_checkpoint`` value into a complete checkpoint folder, or ``None`` to start afresh.

    Args:
        value: ``None``/``false`` (do not resume), ``True``/``true`` (the newest complete checkpoint in
            ``output_dir``, as ``Trainer.train(resume_from_checkpoint=True)`` but skipping incomplete ones) or a path.
        output_dir: The run's output folder.

    Returns:
        The checkpoint folder, or ``None``.

    Raises:
        ValueError: for a path that is not a folder, an incomplete checkpoint (no ``trainer_state.json``), or no
            complete checkpoint in ``output_dir``; each names the checkpoint to use instead when there is one.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _RESUME_NONE):
        return None
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    latest, incomplete = latest_complete_checkpoint(output_dir)
    if value is True or value.strip().lower() in _RESUME_LATEST:
        if latest is None:
            state = (
                f"{os.path.basename(incomplete[0])} is incomplete (no {TRAINER_STATE_NAME}: the run was stopped while "
                "saving it)"
                if incomplete
                else f"it has no {PREFIX_CHECKPOINT_DIR}-N folder"
            )
            raise ValueError(
                f"--resume_from_checkpoint: nothing to resume in {output_dir}: {state}. Start afresh without the flag."
            )
        for path in incomplete:
            print(
                f"[soft-peft] {os.path.basename(path)} is incomplete (no {TRAINER_STATE_NAME}); resuming from "
                f"{os.path.basename(latest)}, the latest complete checkpoint.",
                flush=True,
            )
        return latest
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")
    if not os.path.isfile(os.path.join(value, TRAINER_STATE_NAME)):
        here = os.path.dirname(os.path.abspath(value))
        other, _ = latest_complete_checkpoint(here)
        instead = (
            f"resume from {other}, the latest complete checkpoint, or pass --resume_from_checkpoint alone to pick it"
            if other is not None
            else "start afresh without --resume_from_checkpoint"
        )
        raise ValueError(
            f"--resume_from_checkpoint {value}: {os.path.basename(os.path.normpath(value))} is incomplete (no "
            f"{TRAINER_STATE_NAME}: the run was stopped while saving it); {instead}."
        )
    return value
