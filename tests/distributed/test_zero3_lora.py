"""LoRA under DeepSpeed ZeRO-3 with 2 CPU processes (gloo): the saved adapter is the one a single process trains on
the same global batch (gathered whole, not ZeRO-3's placeholders), with its exits beside it, and `soft-peft generate`
and `soft-peft eval` read it."""

from __future__ import annotations

import json

import pytest
import torch
from example_runs import (
    CPU_SCRIPT_ARGS,
    EXAMPLES,
    accelerate_launch,
    alpaca_rows,
    exit_metrics,
    gsm8k_rows,
    run,
    save_tiny_model,
    step_logs,
    tiny_args,
    write_jsonl,
)
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_peft.cli import main as soft_peft_main
from soft_peft.exits import record_exit_layers

pytestmark = [
    pytest.mark.distributed,
    # PEFT 0.21's `PeftModel.from_pretrained` (the tests' reference loader) reads a property transformers 5 deprecates
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

LORA = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
# No LoRA dropout: its masks come from each process's own random stream, so one process would draw other ones
LORA += ["--lora_dropout", "0"]
STEP_RTOL = 1e-5  # fp32 on CPU: the runs differ only in the order of float reductions
WEIGHTS_ATOL = 1e-5  # after 2 Adam steps from identical states, same reason
EVAL_RTOL = 1e-4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The base model folder, and the adapters of a ZeRO-3 run and of one process on the same batches."""
    root = tmp_path_factory.mktemp("zero3-lora")
    model_dir = save_tiny_model(root / "tiny")
    data = write_jsonl(root / "alpaca.jsonl", alpaca_rows())
    common = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), *LORA]
    common += ["--train_sampling_strategy", "sequential"]
    single = root / "single"
    argv = [*common, *tiny_args(per_device_batch=2), *CPU_SCRIPT_ARGS["single"], "--output_dir", str(single)]
    run(["python", str(EXAMPLES / "alpaca.py"), *argv])
    zero3 = root / "zero3"
    argv = [*common, *tiny_args(per_device_batch=1), "--output_dir", str(zero3)]
    result = accelerate_launch("zero3", EXAMPLES / "alpaca.py", argv)
    assert result.returncode == 0, result.stdout + result.stderr
    return model_dir, zero3, single


def test_zero3_adapter_equals_one_process_adapter(adapters):
    _, zero3, single = adapters
    assert not (zero3 / "model.safetensors").exists() and not (zero3 / "config.json").exists()
    assert json.loads((zero3 / "soft_peft_config.json").read_text()) == {"soft_exit_layers": [2, 4]}
    assert json.loads((zero3 / "adapter_config.json").read_text())["r"] == 4
    weights, expected = load_file(zero3 / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert weights.keys() == expected.keys() and any("lora_B" in name for name in weights)
    for name, tensor in expected.items():  # gathered from the ranks, not ZeRO-3's empty placeholders
        assert weights[name].shape == tensor.shape and tensor.numel() > 0, name
        torch.testing.assert_close(weights[name], tensor, atol=WEIGHTS_ATOL, rtol=0, msg=name)
    assert all(weights[name].abs().max() > 0 for name in weights if "lora_B" in name)  # trained: B starts at 0
    logs, expected_logs = step_logs(zero3), step_logs(single)
    assert sorted(logs) == [1, 2] and {"exit_2/loss", "exit_4/loss"} <= set(logs[1])
    for step in logs:
        assert exit_metrics(logs[step]) == pytest.approx(exit_metrics(expected_logs[step]), rel=STEP_RTOL), step


@pytest.mark.parametrize("mode", [[], ["--draft_exit", "2"]])
def test_generate_reads_the_zero3_adapter(adapters, mode, capsys):
    model_dir, zero3, _ = adapters
    argv = ["generate", "--model_name_or_path", str(zero3), "--prompt", "Add 3 and 4.", "--max_new_tokens", "6"]
    assert soft_peft_main([*argv, *mode]) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), zero3).eval()
    input_ids = tokenizer("Add 3 and 4.", return_tensors="pt").input_ids
    sequences = model.generate(input_ids=input_ids, do_sample=False, max_new_tokens=6)
    assert text == tokenizer.decode(sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
    if mode:
        assert json.loads(stats)["draft_exit"] == 2


def test_eval_reads_the_zero3_adapter(adapters, tmp_path):
    """`soft-peft eval` on the adapter folder scores what the base model with the adapter merged in scores."""
    model_dir, zero3, _ = adapters
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(6))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), zero3).merge_and_unload()
    record_exit_layers(merged, [2, 4])
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "merged")

    def exit_losses(model, *flags: str) -> dict[str, float]:
        out = tmp_path / f"eval-{len(list(tmp_path.iterdir()))}"
        argv = ["eval", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out)]
        assert soft_peft_main([*argv, *flags, "--no_progress"]) == 0
        exits = json.loads((out / "metrics.json").read_text())["exits"]
        return {exit: values["loss"] for exit, values in exits.items()}

    losses = exit_losses(zero3)
    assert sorted(losses, key=int) == ["2", "4"]  # the exits recorded beside the adapter
    assert losses == pytest.approx(exit_losses(tmp_path / "merged"), rel=EVAL_RTOL)
    # The base model alone scores differently: the adapter was applied
    base = exit_losses(model_dir, "--exits", "2,4")
    assert all(abs(losses[exit] - base[exit]) > 1e-4 for exit in losses)
