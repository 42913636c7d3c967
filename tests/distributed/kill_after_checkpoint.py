"""`examples/alpaca.py`'s training, but every rank SIGKILLs itself right after the checkpoint of step
`$KILL_AFTER_STEP` is on disk: a crash at a known point, for the resume tests."""

import os
import signal
import sys

import torch.distributed as dist
from transformers import TrainerCallback

from soft_peft.cli.train import train
from soft_peft.cli.train_args import parse_args


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has finished writing its part of the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    train(*parse_args(sys.argv[1:]), callbacks=[KillAfterCheckpoint(int(os.environ["KILL_AFTER_STEP"]))])
    sys.exit(f"training finished without being killed at step {os.environ['KILL_AFTER_STEP']}")
