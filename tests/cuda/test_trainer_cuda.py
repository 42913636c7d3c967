"""`SoFTTrainer` for a few bf16 steps on tiny dense and MoE models, on the CPU and on CUDA: every exit's metrics are
logged and fall, and the checkpoint reloads as a vanilla model with the trained weights and `soft_exit_layers`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cuda_devices import DEVICES
from datasets import Dataset
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, MixtralConfig

from soft_peft import SoFTConfig, SoFTTrainer

STEPS = 8
EXITS = [2, 4]


def tiny_moe():
    """A tiny Mixtral (4 experts, 2 per token) built like tests/tiny_models.py's models."""
    config = MixtralConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def arithmetic():
    return Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b}."} for a in range(8) for b in range(8)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_bf16_training_logs_every_exit_and_reloads(device, arch, tmp_path):
    model = tiny_moe() if arch == "mixtral" else tiny_model(arch)
    model = model.to(torch.bfloat16)  # loaded in bf16, as the recipes do (`dtype: bfloat16`)
    args = SoFTConfig(
        output_dir=str(tmp_path),
        exit_layers=EXITS,
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        report_to="none",
        bf16=True,
        use_cpu=device == "cpu",
        seed=0,
    )
    trainer = SoFTTrainer(model=model, args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer())
    trainer.train()
    assert next(trainer.model.parameters()).device.type == device

    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == STEPS
    if arch == "mixtral":  # TRL's default router load-balancing loss, added once and logged as SFTTrainer logs it
        assert all(math.isfinite(entry["aux_loss"]) and entry["aux_loss"] > 0 for entry in history)
    for layer in EXITS:
        losses = [entry[f"exit_{layer}/loss"] for entry in history]
        assert all(math.isfinite(loss) for loss in losses), losses
        assert losses[-1] < losses[0], (layer, losses)
        assert all(0 <= entry[f"exit_{layer}/mean_token_accuracy"] <= 1 for entry in history)

    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    assert json.loads((checkpoint / "config.json").read_text())["soft_exit_layers"] == EXITS
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    assert reloaded.config.soft_exit_layers == EXITS
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name].cpu(), rtol=0, atol=0, msg=name)
