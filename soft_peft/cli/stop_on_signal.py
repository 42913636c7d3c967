"""SIGTERM and SIGINT end a run at the next optimizer step boundary, with a resumable checkpoint.

A cluster scheduler sends SIGTERM before pre-emption, and Ctrl-C sends SIGINT: by default both kill the run and lose
everything since the last save. [`StopOnSignal`] turns them into "finish this optimizer step, save a normal
`checkpoint-N` through the Trainer's own checkpointing, stop". In a distributed run the signal may reach only some
ranks, so the ranks agree (an all-reduce of the flag at every step end) and all stop at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..resume import TRAINER_STATE_NAME, latest_complete_checkpoint

__all__ = ["StopOnSignal"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """A `TrainerCallback` that, on SIGTERM or SIGINT, saves a checkpoint at the end of the current optimizer step and
    stops training.

    The handlers are installed when training begins and restored when it ends. Further signals while stopping are
    noted, not acted on (a launcher forwards the Ctrl-C that its workers already got); SIGKILL or Ctrl-\\ still end
    the process at once, without a checkpoint.

    A signal during the last optimizer step does not stop the run: training is complete, and the caller saves the
    final model as usual. A signal the process started with ignored (SIGINT in a shell's background job) stays ignored.

    After `trainer.train()` returns, `signal_name` tells whether a signal stopped it (`None` if not), and
    [`resume_hint`] gives the line saying how to resume.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.step: int | None = None
        self.checkpoint: str | None = None
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._noted_complete = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._received is None:
            self._received = signum
            print(
                f"[soft-peft] rank {os.environ.get('RANK', '0')}: {name} received: finishing this optimizer step, "
                "saving a checkpoint, then stopping (SIGKILL stops at once, without one).",
                file=sys.stderr,
                flush=True,
            )

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # Python handles signals in the main thread
            return
        for signum in _SIGNALS:
            # An ignored signal stays ignored: a shell starts background jobs (`cmd &`) with SIGINT ignored, so that
            # a Ctrl-C meant for the terminal's foreground job does not stop them
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        received = self._received or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must stop at the same step, also when the signal reached only some of them
            flag = torch.tensor([received], dtype=torch.int64, device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag.item())
        if received and state.max_steps > 0 and state.global_step >= state.max_steps:
            # The last step is done, so nothing remains to resume: let the run end as usual, with its final model
            if not self._noted_complete:
                self._noted_complete = True
                print(
                    f"[soft-peft] {signal.Signals(received).name} came during the last step, which completed "
                    "training: saving the final model as usual.",
                    file=sys.stderr,
                    flush=True,
                )
            return control
        if received:
            self.signal_name = signal.Signals(received).name
            self.step = state.global_step
            self.checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

    def restore_handlers(self) -> None:
        """Put back the handlers found at train begin (also after an exception ended training early)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal (128 + its number); 0 if no signal stopped training."""
        return 128 + int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def resume_hint(self, max_steps: int | None = None) -> str:
        """One line: the signal, the step and checkpoint, and the `--resume_from_checkpoint` flag that continues."""
        of = f" of {max_steps}" if max_steps and max_steps > 0 else ""
        if os.path.isfile(os.path.join(self.checkpoint, TRAINER_STATE_NAME)):
            return (
                f"[soft-peft] stopped by {self.signal_name} after step {self.step}{of}; checkpoint saved. Resume with "
                f"the same command plus: --resume_from_checkpoint {self.checkpoint}"
            )
        # The Trainer declined the save (`save_strategy="best"` after an evaluation that was not the best)
        latest, _ = latest_complete_checkpoint(os.path.dirname(self.checkpoint))
        where = (
            f"resume from the latest one with the same command plus: --resume_from_checkpoint {latest}"
            if latest
            else "no checkpoint to resume from: start afresh"
        )
        return (
            f"[soft-peft] stopped by {self.signal_name} after step {self.step}{of}, but the Trainer saved no "
            f"checkpoint at that step; {where}"
        )
