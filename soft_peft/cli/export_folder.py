"""Where an export may be written, decided before any model loads, and a write that never leaves a mix behind.

An export never replaces the model it reads, and never lands in a folder that holds something else unless the user
asked for that folder to be replaced, and the folder holds a saved model (or nothing): files left from an earlier save
(an ``adapter_config.json``, extra shards) would be loaded together with the new model by ``from_pretrained``, and a
folder of other files (a home folder, a project) must never be deleted by a flag meant for an old export.

One export at a time per folder: an exclusive lock beside it ([`OutputDirLock`] on ``.NAME.soft-peft.lock``, not
inside the folder, which the swap replaces). The new folder is written beside the target (``.NAME.partial-*``) and
swapped in only once complete: the old folder is renamed aside (``.NAME.replaced-*``), the new one renamed in, then
the old one deleted. So a failure leaves the old contents as they were, and a kill at any point leaves one complete
export, at the target or aside, which the next export into that folder puts back or removes, saying so.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

from .folder_writes import nearest_existing, unwritable_reason
from .output_dir_lock import OutputDirLock

__all__ = [
    "adapter_base_of",
    "check_export_folder",
    "check_export_target",
    "export_lock",
    "recover_interrupted_export",
    "staged_folder",
    "writes_over_model",
]

_PARTIAL, _REPLACED = ".partial-", ".replaced-"
# What `save_pretrained` writes: a config and weights, of a full model or of a PEFT adapter
_CONFIGS = ("config.json", "adapter_config.json")
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def adapter_base_of(model_path: str) -> str | None:
    """The base model of a LoRA adapter folder, or ``None`` for a full model (or a Hub id)."""
    adapter_config = os.path.join(model_path, "adapter_config.json")
    if os.path.isfile(os.path.join(model_path, "config.json")) or not os.path.isfile(adapter_config):
        return None
    with open(adapter_config, encoding="utf-8") as handle:
        return json.load(handle).get("base_model_name_or_path") or None


def writes_over_model(output_dir: str, sources: Sequence[str]) -> str | None:
    """Why writing to ``output_dir`` would destroy one of the local model folders ``sources`` (the model read, an
    adapter's base model): it is that folder or contains it. ``None`` when it is clear; Hub ids are skipped."""
    target = os.path.realpath(output_dir)
    for source in sources:
        if not source or not os.path.isdir(source):
            continue
        source = os.path.realpath(source)
        if _is_within(source, target):
            what = "is" if source == target else "contains"
            return (
                f"--output_dir {output_dir} {what} the model being read ({source}): writing there would destroy it "
                "(even with --overwrite_output_dir). Choose another --output_dir."
            )
    return None


def _holds_saved_model(folder: str) -> bool:
    """A ``save_pretrained`` folder (a config and weights), or one export per exit (``N-layers`` folders)."""
    names = set(os.listdir(folder))
    if names & set(_CONFIGS) and names & set(_WEIGHTS):
        return True
    return bool(names) and all(
        name.endswith("-layers")
        and os.path.isdir(os.path.join(folder, name))
        and _holds_saved_model(os.path.join(folder, name))
        for name in names
    )


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def check_export_target(output_dir: str, sources: Sequence[str]) -> str | None:
    """Why no export read from ``sources`` may be written to ``output_dir`` at all, or ``None``; checked before its
    lock is taken (the lock file goes beside it).

    Args:
        output_dir: The folder to write (need not exist).
        sources: The local folders the export reads (the model, and an adapter's base model); Hub ids are skipped.

    Returns:
        A one-line reason naming the fix, or ``None``.
    """
    reason = writes_over_model(output_dir, sources)
    if reason:
        return reason
    target = os.path.realpath(output_dir)
    if os.path.exists(target) and not os.path.isdir(target):
        return f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir."
    # The parent receives the staged folder and the lock; an existing folder is renamed aside, which writes its `..`
    for folder in [nearest_existing(os.path.dirname(target))] + ([target] if os.path.isdir(target) else []):
        problem = unwritable_reason(folder)
        if problem:
            return f"--output_dir {output_dir}: {folder} is not writable ({problem}); choose another --output_dir."
    return None


def check_export_folder(output_dir: str, overwrite: bool) -> str | None:
    """Why the contents of ``output_dir`` forbid writing an export there, or ``None``; checked under its lock.

    Args:
        output_dir: The folder to write (need not exist).
        overwrite: ``--overwrite_output_dir``: a non-empty ``output_dir`` holding a saved model will be replaced.

    Returns:
        A one-line reason naming the fix, or ``None``.
    """
    target = os.path.realpath(output_dir)
    entries = sorted(os.listdir(target)) if os.path.isdir(target) else []
    if entries and not overwrite:
        return (
            f"--output_dir {output_dir} is not empty (it holds {_shown(entries)}); files left there would be loaded "
            "with the new model. Pass --overwrite_output_dir to replace its contents, or choose an empty or new "
            "folder."
        )
    if entries and not _holds_saved_model(target):
        return (
            f"--output_dir {output_dir} holds no saved model (it holds {_shown(entries)}), and "
            "--overwrite_output_dir replaces only a folder an earlier export or save_pretrained wrote (config.json "
            "and weights), as it deletes everything in it. Choose an empty or new folder."
        )
    return None


def export_lock(output_dir: str) -> OutputDirLock:
    """The lock of exports into ``output_dir``: a file beside it, as the folder itself is swapped out."""
    target = os.path.realpath(output_dir)
    lock_file = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.soft-peft.lock")
    return OutputDirLock(output_dir, lock_file=lock_file)


def recover_interrupted_export(output_dir: str) -> list[str]:
    """Put back or remove what an export into ``output_dir`` that was killed left beside it; hold its lock first
    (then no live export owns them). Returns one line per folder, saying what was done."""
    target = os.path.realpath(output_dir)
    prefix = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}")
    done = []
    # `mkdtemp`'s 8 random characters end the name: the folders of another target (`out.partial-1`) never match
    for aside in sorted(glob.glob(glob.escape(prefix + _REPLACED) + "?" * 8)):
        if os.path.lexists(target):  # killed after the new export was renamed in: this is the old one
            shutil.rmtree(aside)
            done.append(f"removed {aside}, the previous export that an interrupted export had replaced.")
        else:  # killed between the two renames: this is the only complete export
            os.rename(aside, target)
            done.append(f"restored the previous export to {output_dir} (an interrupted export had moved it aside).")
    for partial in sorted(glob.glob(glob.escape(prefix + _PARTIAL) + "?" * 8)):
        shutil.rmtree(partial)
        done.append(f"removed {partial}, the unfinished folder of an interrupted export.")
    return done


@contextlib.contextmanager
def staged_folder(output_dir: str) -> Iterator[str]:
    """A fresh folder beside ``output_dir`` to write into; on success it replaces ``output_dir`` (whose previous
    contents are deleted), on failure it is removed and ``output_dir`` is left untouched. Hold [`export_lock`].

    The old folder is renamed aside, the new one renamed in, and only then the old one deleted: a kill at any point
    leaves one complete export, which [`recover_interrupted_export`] puts back or removes.

    Args:
        output_dir: The final folder; its parent is created if missing.

    Yields:
        The staging folder's path.
    """
    target = os.path.realpath(output_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{_PARTIAL}", dir=os.path.dirname(target))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the exported folder's mode
    try:
        yield staging
        aside = None
        if os.path.lexists(target):
            aside = os.path.join(os.path.dirname(staging), os.path.basename(staging).replace(_PARTIAL, _REPLACED))
        if aside:
            os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            if aside:
                os.rename(aside, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside:
        try:
            shutil.rmtree(aside)
        except OSError as error:  # the export is in place; the next export into this folder removes the rest
            print(
                f"warning: could not remove the previous export {aside} ({error}); remove it yourself.",
                file=sys.stderr,
            )
