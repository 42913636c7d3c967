"""Where an export may be written, decided before any model loads, and a write that never leaves a mix behind.

An export never replaces the model it reads, and never lands in a folder that holds something else unless the user
asked for that folder to be replaced: files left from an earlier save (an ``adapter_config.json``, extra shards)
would be loaded together with the new model by ``from_pretrained``. The new folder is written beside the target
first and swapped in only once complete, so a failure leaves the old contents as they were.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

__all__ = ["check_export_folder", "staged_folder"]


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_export_folder(output_dir: str, sources: Sequence[str], overwrite: bool) -> str | None:
    """Why ``output_dir`` cannot receive an export read from ``sources``, or ``None`` when it can.

    Args:
        output_dir: The folder to write (need not exist).
        sources: The local folders the export reads (the model, and an adapter's base model); Hub ids are skipped.
        overwrite: ``--overwrite_output_dir``: a non-empty ``output_dir`` will be replaced.

    Returns:
        A one-line reason naming the fix, or ``None``.
    """
    target = os.path.realpath(output_dir)
    for source in sources:
        if not os.path.isdir(source):
            continue
        source = os.path.realpath(source)
        if _is_within(source, target):
            what = "is" if source == target else "contains"
            return (
                f"--output_dir {output_dir} {what} the model being read ({source}): writing there would destroy it "
                "(even with --overwrite_output_dir). Choose another --output_dir."
            )
    if os.path.exists(target) and not os.path.isdir(target):
        return f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir."
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        entries = sorted(os.listdir(target))
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        return (
            f"--output_dir {output_dir} is not empty (it holds {shown}); files left there would be loaded with the "
            "new model. Pass --overwrite_output_dir to replace its contents, or choose an empty or new folder."
        )
    parent = os.path.dirname(target)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.isdir(target) and not os.access(target, os.W_OK)):
        return f"--output_dir {output_dir}: {parent} is not writable; choose another --output_dir."
    return None


@contextlib.contextmanager
def staged_folder(output_dir: str) -> Iterator[str]:
    """A fresh folder beside ``output_dir`` to write into; on success it replaces ``output_dir`` (whose previous
    contents are deleted), on failure it is removed and ``output_dir`` is left untouched.

    Args:
        output_dir: The final folder; its parent is created if missing.

    Yields:
        The staging folder's path.
    """
    target = os.path.realpath(output_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=os.path.dirname(target))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the exported folder's mode
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.rename(staging, target)
