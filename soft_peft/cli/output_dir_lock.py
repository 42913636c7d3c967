"""One run per output folder: a lock file in `--output_dir` (or beside it) holding the holder's PID and host.

The lock is an exclusive `flock` on `output_dir/.soft-peft.lock`, held until the process exits: the kernel gives it to
one process only, so two runs started together cannot both pass, and it frees it when the holder dies however it
dies. The file's content (PID, host, start time) only names the holder in the refusal, and tells a lock left behind
by a killed run ("stale": the lock is free but the file still names its holder) from a clean start.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time

__all__ = ["LOCK_FILE", "OutputDirLock", "OutputDirInUse", "holds_output_dir_lock"]

LOCK_FILE = ".soft-peft.lock"


class OutputDirInUse(Exception):
    """Another live run holds the lock of the output folder."""


def holds_output_dir_lock(save_on_each_node: bool = False) -> bool:
    """Whether this process takes the lock of a (possibly distributed) run: one process per run.

    The global main process (`RANK` 0) locks the folder; with `save_on_each_node` (a folder per node), the main
    process of each node (`LOCAL_RANK` 0). The other ranks belong to the same run and never lock or refuse.
    Read from the launcher's environment, as the lock is taken before any process group exists.
    """
    variable = "LOCAL_RANK" if save_on_each_node else "RANK"
    return int(os.environ.get(variable, "0")) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


class OutputDirLock:
    """Exclusive lock of a training output folder, as a context manager (the kernel frees it if the process dies).

    Args:
        output_dir: The folder, as the user gave it (for the messages).
        lock_file: The lock file: ``output_dir/.soft-peft.lock`` by default; one beside ``output_dir`` for a folder
            that is replaced as a whole (an export). Its folder is created if missing, as the run writes there anyway.

    Raises:
        OutputDirInUse: on `acquire()`, when a live run holds the lock; the message names it.
    """

    def __init__(self, output_dir: str | os.PathLike, lock_file: str | os.PathLike | None = None):
        self.output_dir = os.fspath(output_dir)
        self.path = os.fspath(lock_file) if lock_file is not None else os.path.join(self.output_dir, LOCK_FILE)
        self._folder = os.path.dirname(self.path)
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> OutputDirLock:
        """Take the lock, or raise `OutputDirInUse` naming the holder. A stale lock is taken over with a message."""
        import fcntl

        self._created_dir = not os.path.isdir(self._folder)
        os.makedirs(self._folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = self._read(fd)
                os.close(fd)
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputDirInUse(self._in_use_message(holder)) from None
                # No `flock` on this file system (some network mounts): judge by the recorded PID alone
                if holder and holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"])):
                    os.unlink(self.path)
                    continue
                if holder:
                    raise OutputDirInUse(self._in_use_message(holder)) from None
                raise
            # The holder may have removed the file between our open and flock: then we locked a deleted file
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            break
        previous = self._read(fd)
        if previous:
            print(
                f"[soft-peft] --output_dir {self.output_dir}: taking over the stale lock of {_describe(previous)}, "
                "which ended without releasing it.",
                file=sys.stderr,
                flush=True,
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and free the lock (idempotent); remove the lock file's folder too if the lock created
        it and it is still empty (a run refused before writing anything)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # while still locked, so no other run can lock the file we remove
        except FileNotFoundError:
            pass
        os.close(fd)
        if self._created_dir:
            try:
                os.rmdir(self._folder)
            except OSError:  # not empty: the run wrote there
                pass

    def _read(self, fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?"}

    def _in_use_message(self, holder: dict) -> str:
        who = _describe(holder) if holder else "another process"
        return (
            f"--output_dir {self.output_dir} is in use by another run ({who}): wait for it to end, stop it, or "
            f"choose another --output_dir."
        )

    def __enter__(self) -> OutputDirLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
