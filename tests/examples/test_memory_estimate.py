"""recipes/memory_estimate.py against DeepSpeed's own ZeRO-3 estimator, and recipes/README.md against the script."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def estimate():
    spec = importlib.util.spec_from_file_location("memory_estimate", RECIPES / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counts_of(shape: dict) -> tuple[int, int]:
    """Total and largest-module parameter counts of the transformers model (meta device: no memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
    # DeepSpeed's `model_to_params` counts the same, but dedups by data_ptr, which meta tensors do not have
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return total, largest


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("variant", ["llama2-13b", "gqa-tied"])
def test_zero3_model_states_equal_deepspeeds_estimator(estimate, gpus, variant):
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    shape = estimate.LLAMA2_13B
    if variant == "gqa-tied":
        shape = {**shape, "num_key_value_heads": 8, "tie_word_embeddings": True}
    total, largest = counts_of(shape)
    assert estimate.largest_layer_parameter_count(shape) == largest
    _, gpu_bytes, _ = stage3.estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    ours = estimate.estimate(shape, gpus, batch=4, seq=512, lora_rank=None, shard=True)
    assert (ours["weights_GB"] + ours["grads_adam_GB"]) * estimate.GB == pytest.approx(gpu_bytes, rel=1e-9)


def test_lora_parameter_count_equals_peft_on_every_linear_layer(estimate):
    """The closed-form LoRA count is what PEFT trains with `target_modules="all-linear"` (grouped-query attention)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {**estimate.LLAMA2_13B, "num_hidden_layers": 2, "num_key_value_heads": 8}
    with torch.device("meta"):
        model = get_peft_model(
            AutoModelForCausalLM.from_config(LlamaConfig(**shape)), LoraConfig(r=32, target_modules="all-linear")
        )
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.lora_parameter_count(shape, 32) == trained


def test_readme_memory_table_is_the_scripts(estimate):
    """The README's full fine-tuning rows are what the script prints for LLaMA-2 13B, 8 GPUs, 4 x 512 tokens."""
    readme = (RECIPES / "README.md").read_text()
    rows = {
        "full, no sharding": estimate.estimate(estimate.LLAMA2_13B, 8, 4, 512, None, shard=False),
        "full, ZeRO-3 / FSDP2 on 8 GPUs": estimate.estimate(estimate.LLAMA2_13B, 8, 4, 512, None, shard=True),
    }
    for name, expected in rows.items():
        match = re.search(
            rf"^\| {re.escape(name)} \| ([\d.]+) GB \| ([\d.]+) GB \| ([\d.]+) GB \| \*\*([\d.]+) GB", readme, re.M
        )
        assert match is not None, f"recipes/README.md has no row '{name}'"
        keys = ("weights_GB", "grads_adam_GB", "activations_GB", "total_GB")
        assert [float(x) for x in match.groups()] == [round(expected[k], 1) for k in keys], name
