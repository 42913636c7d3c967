"""Integration on the real SmolLM2-135M-Instruct (30 layers, tied head) with real GSM8K rows."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_peft import SoFTConfig, SoFTTrainer
from soft_peft.data import load_prompt_completion

pytestmark = pytest.mark.slow


def test_soft_steps_on_gsm8k_lower_every_exit(smollm2_path, gsm8k_path, tmp_path):
    rows = load_prompt_completion(str(gsm8k_path), "gsm8k").select(range(4))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    args = SoFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        max_length=160,
        learning_rate=2e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = SoFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer.exit_layers == [9, 12, 15, 18, 21, 24, 27, 30]

    # Before training, exit 30 is the model's own loss on the batch
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        own = model(**batch).loss
        soft = model(**batch, soft_exit_loss=True)
    torch.testing.assert_close(soft.exit_losses[30], own, rtol=1e-4, atol=1e-4)

    trainer.train()
    history = [entry for entry in trainer.state.log_history if "exit_30/loss" in entry]
    assert len(history) == 4
    for k in trainer.exit_layers:
        first, last = history[0][f"exit_{k}/loss"], history[-1][f"exit_{k}/loss"]
        assert torch.isfinite(torch.tensor([first, last])).all()
        assert last < first, (k, first, last)
    # the untrained early exits start far worse than the last layer
    assert history[0]["exit_9/loss"] > history[0]["exit_30/loss"] + 1.0
