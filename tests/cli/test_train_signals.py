"""`StopOnSignal` alone (the kill test in tests/distributed/test_stop_on_signal.py runs it in real runs): a real
signal sets the stop at the next step end, repeated signals change nothing, and the handlers are put back."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

from transformers import TrainerControl, TrainerState

from soft_peft.cli.stop_on_signal import StopOnSignal


def test_a_signal_stops_at_the_next_step_end_with_a_checkpoint(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop, args = StopOnSignal(), SimpleNamespace(output_dir=str(tmp_path / "out"), device="cpu")
    state, control = TrainerState(global_step=3, max_steps=10), TrainerControl()
    stop.on_train_begin(args, state, control)
    try:
        stop.on_step_end(args, state, control)
        assert not control.should_save and not control.should_training_stop and stop.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # noted, not acted on: no KeyboardInterrupt, still SIGTERM
        state.global_step = 4
        stop.on_step_end(args, state, control)
    finally:
        stop.on_train_end(args, state, control)
    assert control.should_save and control.should_training_stop
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert stop.exit_code == 128 + signal.SIGTERM
    # Never a resume line naming a checkpoint that is not there
    not_saved = stop.resume_hint(10)
    assert not_saved.endswith("saved no checkpoint at that step; no checkpoint to resume from: start afresh")
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert stop.resume_hint(10).endswith(f"--resume_from_checkpoint {tmp_path / 'out' / 'checkpoint-2'}")
    (tmp_path / "out" / "checkpoint-4").mkdir()
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert stop.resume_hint(10) == (
        "[soft-peft] stopped by SIGTERM after step 4 of 10; checkpoint saved. Resume with the same command plus: "
        f"--resume_from_checkpoint {tmp_path / 'out' / 'checkpoint-4'}"
    )
    assert capsys.readouterr().err.count("SIGTERM received") == 1


def test_a_signal_during_the_last_step_lets_the_run_end_with_its_final_model(tmp_path, capsys):
    """Training is complete after the last step: stopping there would skip the final save for nothing to resume."""
    stop, args = StopOnSignal(), SimpleNamespace(output_dir=str(tmp_path / "out"), device="cpu")
    state, control = TrainerState(global_step=10, max_steps=10), TrainerControl()
    stop.on_train_begin(args, state, control)
    try:
        # SIGTERM: a shell starts background jobs with SIGINT ignored, which the stop keeps ignored
        os.kill(os.getpid(), signal.SIGTERM)
        stop.on_step_end(args, state, control)
        stop.on_step_end(args, state, control)
    finally:
        stop.on_train_end(args, state, control)
    assert stop.signal_name is None and stop.exit_code == 0
    assert not control.should_save and not control.should_training_stop
    assert capsys.readouterr().err.count("came during the last step, which completed training") == 1


def test_an_ignored_signal_stays_ignored(tmp_path):
    """A background job (`cmd &`) starts with SIGINT ignored: a Ctrl-C meant for the foreground must not stop it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop, args = StopOnSignal(), SimpleNamespace(output_dir=str(tmp_path / "out"), device="cpu")
    state, control = TrainerState(global_step=3, max_steps=10), TrainerControl()
    try:
        stop.on_train_begin(args, state, control)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle  # the other one is still caught
        os.kill(os.getpid(), signal.SIGINT)
        stop.on_step_end(args, state, control)
        assert stop.signal_name is None and not control.should_training_stop
    finally:
        stop.on_train_end(args, state, control)
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle
