"""Whether a folder can really be written, what a write that failed for lack of space or permission says, and a final
save that leaves no partial files behind when it fails.

Permission bits alone do not say whether a save will succeed: `os.access` grants root everything, and network or FUSE
mounts may refuse a write it allowed. So writability is tested by creating (and removing) a file. A disk that fills
while saving shows as an `OSError` from Python's own writes, but as a `SafetensorError` or a torch `RuntimeError`
from the weight writers, whose only trace of the cause is their text; all of them are recognised here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

__all__ = ["nearest_existing", "removing_new_files", "unwritable_reason", "write_failure"]

# The errors a save meets when the disk is full or the folder is closed to writing, and how a user would say them
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_CLOSED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
# The text the Rust and C++ weight writers carry instead of an errno
_FULL_TEXTS = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded", "os error 122")


def nearest_existing(path: str) -> str:
    """``path`` made absolute, or its nearest ancestor that exists."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def unwritable_reason(folder: str) -> str | None:
    """Why no file can be created in the existing ``folder`` (``"permission denied"``, ...), or ``None`` if one can.

    Checked by creating and removing a file, not by permission bits (see the module's docstring).
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    probe = os.path.join(folder, f".soft-peft-write-test-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        return _CLOSED.get(error.errno) or _FULL.get(error.errno) or (error.strerror or type(error).__name__).lower()
    os.close(fd)
    os.unlink(probe)
    return None


def write_failure(error: BaseException) -> tuple[str, bool] | None:
    """``(reason, full)`` when ``error`` (or an error it came from) is a write refused for lack of space (``full``)
    or permission; ``None`` for any other error, which the caller lets through unchanged."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None)
        if code in _FULL:
            return _FULL[code], True
        if code in _CLOSED:
            return _CLOSED[code], False
        text = str(error).lower()
        if any(marker in text for marker in _FULL_TEXTS):
            return "no space left on device", True
        error = error.__cause__ or error.__context__
    return None


def _files(folder: str) -> dict[str, tuple[int, int, int]]:
    if not os.path.isdir(folder):
        return {}
    found = {}
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            info = entry.stat(follow_symlinks=False)
            found[entry.name] = (info.st_ino, info.st_mtime_ns, info.st_size)
    return found


@contextlib.contextmanager
def removing_new_files(folder: str) -> Iterator[None]:
    """On an error inside the block, delete the files directly in ``folder`` that the block created or rewrote.

    For a save into a folder that holds other things (a run's checkpoints, its lock): a save cut off half way would
    otherwise leave a ``config.json`` beside truncated weights, which looks like a finished model and makes the next
    run refuse the folder as holding one. Folders (checkpoints) are left alone.
    """
    before = _files(folder)
    try:
        yield
    except BaseException:
        for name, signature in _files(folder).items():
            if before.get(name) != signature:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
        raise
