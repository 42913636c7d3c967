"""A run owns its output folder: a second run on a locked folder refuses at once, naming the holder; runs started
together cannot both pass; a lock left by a killed run is taken over with a message; only one process per run locks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_cli_helpers import Loaded, alpaca_data, refuse_loading, train_argv

from soft_peft.cli import output_dir_lock
from soft_peft.cli.output_dir_lock import LOCK_FILE, OutputDirInUse, OutputDirLock, holds_output_dir_lock
from soft_peft.cli.train import main as train_main

# A process holding the lock: it loads output_dir_lock.py alone (standard library only), so it starts in milliseconds
HOLDER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("output_dir_lock", sys.argv[1])
output_dir_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(output_dir_lock)
folder, go, hold = sys.argv[2], sys.argv[3], float(sys.argv[4])
if go != "-":
    open(go + f".ready-{os.getpid()}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.002)
try:
    lock = output_dir_lock.OutputDirLock(folder).acquire()
except output_dir_lock.OutputDirInUse as error:
    print("refused:", error, flush=True)
    sys.exit(3)
print("locked", flush=True)
if hold < 0:
    os.kill(os.getpid(), 9)  # dies holding it: the lock file stays behind
time.sleep(hold)
lock.release()
"""


def start_holder(folder: Path, go: str = "-", hold: float = 60.0) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLDER, output_dir_lock.__file__, str(folder), go, str(hold)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def wait_locked(process: subprocess.Popen) -> None:
    assert process.stdout.readline().strip() == "locked"


def test_a_second_run_on_a_locked_folder_refuses_at_once_naming_the_holder(
    capsys, tmp_path, tiny_model_dir, monkeypatch
):
    refuse_loading(monkeypatch)
    output_dir = tmp_path / "out"
    holder = start_holder(output_dir)
    try:
        wait_locked(holder)
        before = (output_dir / LOCK_FILE).read_text()
        argv = train_argv(tiny_model_dir, alpaca_data(tmp_path), output_dir)
        assert train_main(argv) == 2  # not `Loaded`: refused first
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1, errors
        assert f"--output_dir {output_dir} is in use by another run (PID {holder.pid} on host " in errors[0]
        assert socket.gethostname() in errors[0]
        assert (output_dir / LOCK_FILE).read_text() == before  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()


def test_runs_started_together_never_both_pass(tmp_path):
    go = tmp_path / "go"
    holders = [start_holder(tmp_path / "out", str(go), hold=3.0) for _ in range(6)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < len(holders) and time.monotonic() < deadline:
        time.sleep(0.01)  # until every holder is up and polling for the start signal
    go.touch()
    outputs = [holder.communicate(timeout=60)[0] for holder in holders]
    assert sum(output.startswith("locked") for output in outputs) == 1, outputs
    assert sum(output.startswith("refused") for output in outputs) == 5, outputs


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(capsys, tmp_path):
    holder = start_holder(tmp_path / "out", hold=-1)
    wait_locked(holder)
    assert holder.wait() == -signal.SIGKILL
    stale = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert stale["pid"] == holder.pid

    lock = OutputDirLock(tmp_path / "out").acquire()
    message = capsys.readouterr().err
    assert f"taking over the stale lock of PID {holder.pid} on host {socket.gethostname()}" in message
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_release_removes_the_lock_and_a_folder_it_created_if_still_empty(tmp_path):
    with OutputDirLock(tmp_path / "new"):
        assert (tmp_path / "new" / LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()
    with OutputDirLock(tmp_path / "new"):
        (tmp_path / "new" / "model.safetensors").write_bytes(b"weights")
    assert sorted(os.listdir(tmp_path / "new")) == ["model.safetensors"]  # what the run wrote stays


def test_the_same_process_cannot_lock_twice(tmp_path):
    with OutputDirLock(tmp_path), pytest.raises(OutputDirInUse, match=f"PID {os.getpid()}"):
        OutputDirLock(tmp_path).acquire()


@pytest.mark.parametrize(
    "env, save_on_each_node, expected",
    [
        ({}, False, True),  # one process
        ({"RANK": "0", "LOCAL_RANK": "0"}, False, True),
        ({"RANK": "1", "LOCAL_RANK": "1"}, False, False),
        ({"RANK": "4", "LOCAL_RANK": "0"}, False, False),  # main process of node 2, one shared folder
        ({"RANK": "4", "LOCAL_RANK": "0"}, True, True),  # a folder per node: each node's main process
    ],
)
def test_one_process_per_run_locks(monkeypatch, env, save_on_each_node, expected):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert holds_output_dir_lock(save_on_each_node) is expected


def test_other_ranks_do_not_refuse_their_own_run(monkeypatch, tmp_path, tiny_model_dir):
    refuse_loading(monkeypatch)
    output_dir = tmp_path / "out"
    holder = start_holder(output_dir)  # stands for rank 0 of the same run
    try:
        wait_locked(holder)
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(Loaded):
            train_main(train_argv(tiny_model_dir, alpaca_data(tmp_path), output_dir))
    finally:
        holder.kill()
        holder.wait()


def test_a_refused_run_leaves_no_lock_and_no_folder(capsys, tmp_path, tiny_model_dir, monkeypatch):
    refuse_loading(monkeypatch)
    output_dir = tmp_path / "out"
    argv = train_argv(tiny_model_dir, alpaca_data(tmp_path), output_dir)
    with pytest.raises(Loaded):  # the lock is held while loading, and released when that fails
        train_main(argv)
    assert not output_dir.exists()
