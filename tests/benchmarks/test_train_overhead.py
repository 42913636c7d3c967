"""`benchmarks/train_overhead.py`: SoFT variants timed beside SFT, their flags parsed as the command line does."""

import argparse

import pytest
from example_runs import save_tiny_model
from train_overhead import ROOT, _soft_config_from_flags, main, parse_variant


def test_variant_flags_become_the_soft_config():
    common = {"output_dir": "/tmp/x", "max_steps": 2, "use_cpu": True, "report_to": "none"}
    config = _soft_config_from_flags(common, "--exit_loss_weights last:0.5 --exit_head_grad last --exit_rotation 2")
    assert (config.exit_loss_weights, config.exit_head_grad, config.exit_rotation) == ("last:0.5", "last", 2)
    assert config.max_steps == 2 and config.use_cpu


@pytest.mark.parametrize("text", ["bad", "soft=--exit_rotation 2", "x=exit_rotation 2", "=--exit_rotation 2"])
def test_malformed_variants_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME="):
        parse_variant(text)


def test_sft_and_a_variant_side_by_side(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    data = ROOT / "data" / "gsm8k" / "train_300.jsonl"
    argv = ["--model_name_or_path", str(model), "--dataset", str(data), "--steps", "1", "--fp32"]
    assert main([*argv, "--modes", "sft", "--variant", "head_last=--exit_head_grad last"]) == 0
    table = capsys.readouterr().out
    assert "| sft |" in table and "| head_last |" in table
    assert "Variant `head_last`: SoFT with `--exit_head_grad last`." in table
