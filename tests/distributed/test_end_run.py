"""`end_run`: after a gloo run the process ends at once, with the exit handlers run first; otherwise it returns."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from soft_peft.cli.train import end_run

GLOO_RUN = textwrap.dedent(
    """
    import atexit, sys
    import torch, torch.distributed as dist
    from soft_peft.cli.train import end_run

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    dist.all_reduce(torch.ones(1))  # gloo's worker threads are running
    atexit.register(lambda: print("exit handler ran", flush=True))

    class Trainer:
        def end(self):
            dist.destroy_process_group()
            print("trainer ended", flush=True)

    end_run(Trainer())
    print("end_run returned", flush=True)
    """
)


def test_gloo_run_ends_the_process_after_its_exit_handlers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", GLOO_RUN, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["trainer ended", "exit handler ran"]


def test_run_without_a_process_group_returns():
    class Trainer:
        ended = False

        def end(self):
            self.ended = True

    trainer = Trainer()
    assert end_run(trainer) is None
    assert trainer.ended
