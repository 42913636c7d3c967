"""`examples/alpaca.py`'s training (through `main`, so the exit code is the user's), but rank `$PAUSE_RANK` pauses at
the end of step `$PAUSE_AT_STEP` until its process has received a signal: the test then sends a real SIGTERM/SIGINT
(to this process, to the launcher, or to one rank) at a known step, however fast the steps are.

Rank `$PAUSE_RANK` writes `$PAUSE_DIR/paused-<rank>` holding its PID once it is paused.
"""

import importlib
import os
import signal
import sys
import time

from transformers import TrainerCallback

train_script = importlib.import_module("soft_peft.cli.train")


class PauseForSignal(TrainerCallback):
    def __init__(self, step: int, rank: int, folder: str):
        self.step, self.rank, self.folder = step, rank, folder

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or int(os.environ.get("RANK", "0")) != self.rank:
            return
        # The run's own SIGTERM handler (StopOnSignal's, installed at train begin) records what it received
        handler = signal.getsignal(signal.SIGTERM)
        with open(os.path.join(self.folder, f"paused-{self.rank}"), "w") as handle:
            handle.write(str(os.getpid()))
        deadline = time.monotonic() + 300
        while handler.__self__._received is None:
            if time.monotonic() > deadline:
                sys.exit("no signal arrived while paused")
            time.sleep(0.05)


if __name__ == "__main__":
    pause = PauseForSignal(int(os.environ["PAUSE_AT_STEP"]), int(os.environ["PAUSE_RANK"]), os.environ["PAUSE_DIR"])
    original_train = train_script.train
    train_script.train = lambda *args, **kwargs: original_train(*args, callbacks=[pause], **kwargs)
    sys.exit(train_script.main(dataset_name="tatsu-lab/alpaca", dataset_format="alpaca"))
