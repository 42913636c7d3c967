"""Trained exits of a saved PEFT adapter: written beside it, read back by the loader `soft-peft eval/generate` use."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny_models import tiny_model, tiny_tokenizer

from soft_peft import SoFTConfig, SoFTTrainer, SortedLossWrapper, recorded_exit_layers
from soft_peft.checkpoints import ADAPTER_EXITS_FILE, load_causal_lm, read_adapter_exit_layers
from soft_peft.cli import main as soft_peft_main
from soft_peft.evaluation.pipeline import resolve_eval_exits


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_lora_adapter_records_its_exits_for_the_cli_loader(tmp_path, base_folder):
    data = Dataset.from_list([{"prompt": f"{a}+1=", "completion": f"{a + 1}."} for a in range(16)])
    args = SoFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=8, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, exit_layers=[2, 4],
    )  # fmt: skip
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SoFTTrainer(model=str(base_folder), args=args, train_dataset=data, peft_config=lora)
    trainer.train()
    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    assert json.loads((adapter / ADAPTER_EXITS_FILE).read_text()) == {"soft_exit_layers": [2, 4]}

    model = load_causal_lm(str(adapter))  # what `soft-peft eval` and `soft-peft generate` call
    assert recorded_exit_layers(model) == [2, 4]
    assert resolve_eval_exits(model, None, str(adapter)) == [2, 4]
    # The adapter really is applied: the loaded model reproduces the trained one
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trained(**inputs).logits)
    # A full model records its exits in config.json instead; nothing beside it
    assert read_adapter_exit_layers(base_folder) is None


def test_eval_cli_uses_the_adapters_exits(tmp_path, base_folder):
    model = load_causal_lm(str(base_folder))
    adapter = tmp_path / "adapter"
    from peft import get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    SortedLossWrapper(peft_model, exit_layers=[1, 3]).save_pretrained(adapter)
    tiny_tokenizer().save_pretrained(adapter)
    assert read_adapter_exit_layers(adapter) == [1, 3]
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "eval"
    argv = ["eval", "--model_name_or_path", str(adapter), "--dataset_name", str(data), "--output_dir", str(out)]
    assert soft_peft_main([*argv, "--no_progress"]) == 0
    # The recorded exits, plus the last layer that eval always reports (without them, eval refuses the model)
    assert sorted(json.loads((out / "metrics.json").read_text())["exits"], key=int) == ["1", "3", "4"]
