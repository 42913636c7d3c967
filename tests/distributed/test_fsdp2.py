"""SoFT's exit loss on a model sharded by PyTorch FSDP2 on CPU: losses and gradients equal an unsharded run."""

from __future__ import annotations

from pathlib import Path

import pytest
from example_runs import ROOT, free_port, run

pytestmark = pytest.mark.distributed


def test_soft_loss_under_fsdp2_matches_unsharded():
    script = Path(__file__).resolve().parent / "fsdp2_soft_loss.py"
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    result = run(command, timeout=300, env_overrides={"PYTHONPATH": str(ROOT / "tests")})
    assert "OK" in result.stdout, result.stdout + result.stderr
