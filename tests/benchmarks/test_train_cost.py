"""`python -m benchmarks.train_cost`: SoFT and its variants timed beside SFT (each mode in its own process), the FLOP
model and the ratios checked by hand, the batch halved once when the first mode runs out of memory, and the head
kernels' losses against a plain cross-entropy."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from example_runs import ROOT, save_tiny_model

from benchmarks import train_cost
from benchmarks.train_cost_kernel import head_kernel_run


def _run(mode, seconds, peak, **extra):
    run = {"mode": mode, "device": "cpu", "batch": 4, "median_step_s": seconds, "peak_gb": peak, "tokens": 100}
    run |= {"positions": 90, "labelled": 60, "exits": [4], "hidden": 8, "vocab": 50, "params": 1000}
    return run | {"embedding_params": 400} | extra


def test_flop_model_by_hand():
    sft, soft = _run("sft", 1.0, 2.0), _run("soft", 1.5, 2.0, exits=[2, 4])
    # 8 * (1000 - 400) * 100 for the backbone, 8 * 8 * 50 per scored position
    assert train_cost.step_flops(sft, 90) == 8 * 600 * 100 + 8 * 8 * 50 * 90
    assert train_cost.scored_positions(sft) == 90  # TRL's head on a CPU scores every position
    assert train_cost.scored_positions({**sft, "device": "cuda"}) == 60
    assert train_cost.scored_positions(soft) == 120  # every exit's labelled positions


def test_report_ratios_and_targets():
    results = {"sft": _run("sft", 2.0, 4.0), "soft": _run("soft", 2.4, 4.1, exits=[2, 4])}
    results["soft_last"] = _run("soft_last", 2.0, 4.0)
    results["naive"] = {"mode": "naive", "batch": 4, "error": "out of memory"}
    lines = train_cost.report(results, "### title", [("mine", "--exit_rotation 2")])
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ")}
    flop_ratio = (8 * 600 * 100 + 8 * 8 * 50 * 120) / (8 * 600 * 100 + 8 * 8 * 50 * 90)
    assert rows["| soft"] == f"| soft | 4 | 2.40 | 4.10 | 1.200x | {4.1 / 4.0:.3f}x | {flop_ratio:.3f}x |"
    assert rows["| naive"].startswith("| naive | 4 | out of memory |")
    text = "\n".join(lines)
    assert "Variant `mine`: SoFT with `--exit_rotation 2`." in text
    assert f"memory {4.1 / 4.0:.3f}x, time 1.200x: met." in text  # 1.025 <= 1.05, 1.2 <= 1.1 * 1.2
    assert "FLOP bound" in text and "measured 1.20x" in text


def test_the_first_mode_halves_its_batch_once_when_out_of_memory_and_later_ones_keep_it(monkeypatch):
    calls = []

    def child(args, name, mode, flags, batch):
        calls.append((name, batch))
        if name == "sft" and batch == 0:  # the GPU fill chose 24 rows, which did not fit
            return {"mode": mode, "batch": 24, "error": "out of memory"}
        if name == "naive":
            return {"mode": mode, "batch": batch, "error": "out of memory"}
        return _run(mode, 1.0 + len(calls), 2.0, batch=batch)

    monkeypatch.setattr(train_cost, "_run_child", child)
    args = argparse.Namespace(batch_size=0, rounds=2, shape="tiny")
    runs = {"sft": ("sft", ""), "soft": ("soft", ""), "naive": ("naive", "")}
    results = train_cost.run_modes(args, runs)
    assert calls[:4] == [("sft", 0), ("sft", 12), ("soft", 12), ("naive", 12)]
    assert results["naive"]["error"] == "out of memory" and results["sft"]["batch"] == 12
    assert results["soft"]["median_step_s"] == (4.0 + 7.0) / 2  # the median over its two rounds


def test_variant_flags_become_the_soft_config():
    common = {"output_dir": "/tmp/x", "max_steps": 2, "use_cpu": True, "report_to": "none"}
    config = train_cost._soft_config_from_flags(common, "--exit_loss_weights last:0.5 --exit_head_grad last")
    assert (config.exit_loss_weights, config.exit_head_grad) == ("last:0.5", "last")
    assert config.max_steps == 2 and config.use_cpu


@pytest.mark.parametrize("text", ["bad", "soft=--exit_rotation 2", "x=exit_rotation 2", "=--exit_rotation 2"])
def test_malformed_variants_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        train_cost.build_parser().parse_args(["trainers", "--shapes", "tiny", "--variant", text])
    assert "expected NAME=" in capsys.readouterr().err


def test_sft_and_a_variant_side_by_side_on_a_model(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    data = ROOT / "data" / "gsm8k" / "train_300.jsonl"
    argv = ["trainers", "--model_name_or_path", str(model), "--data", str(data), "--steps", "1", "--fp32"]
    assert train_cost.main([*argv, "--modes", "sft", "--variant", "head_last=--exit_head_grad last"]) == 0
    table = capsys.readouterr().out
    assert "| sft | 4 |" in table and "| head_last | 4 |" in table and "1.000x | 1.000x | 1.000x |" in table
    assert "Variant `head_last`: SoFT with `--exit_head_grad last`." in table


def test_a_random_init_shape_trains_its_eight_exits(tmp_path):
    output = tmp_path / "runs.jsonl"
    argv = ["trainers", "--shapes", "tiny", "--device", "cpu", "--steps", "1", "--max_length", "32"]
    assert train_cost.main([*argv, "--modes", "soft", "--json", str(output)]) == 0
    (run,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert run["shape"] == "tiny" and run["exits"] == list(range(1, 9)) and run["batch"] == 4
    assert run["tokens"] == 4 * 32 and run["labelled"] == 4 * round(32 * 0.68)
    assert len(run["step_times"]) == 2 and run["peak_gb"] > 0


@pytest.mark.parametrize("kernel", ["trl", "soft_peft"])
def test_head_kernels_compute_the_plain_cross_entropy(kernel):
    args = argparse.Namespace(tokens=16, hidden=8, vocab=50, exits=2, repeats=1)
    result = head_kernel_run(kernel, "fp32", args)
    torch.manual_seed(0)  # the kernel run's own inputs, drawn again in the same order
    weight = torch.randn(args.vocab, args.hidden) * 0.02
    states = [torch.randn(args.tokens, args.hidden) for _ in range(args.exits)]
    targets = torch.randint(0, args.vocab, (args.tokens,))
    expected = sum(F.cross_entropy(h @ weight.T, targets, reduction="sum") for h in states)
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["median_s"] > 0 and result["kernel"] == kernel
