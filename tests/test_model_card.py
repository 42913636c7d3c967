"""Model cards: the per-exit metrics a `soft-peft eval` run wrote, and the SoFT section training adds to TRL's card."""

import json

import pytest
from datasets import Dataset
from huggingface_hub import ModelCard
from tiny_models import tiny_model, tiny_tokenizer

from soft_peft import SoFTConfig, SoFTTrainer
from soft_peft.model_card import load_eval_metrics, model_card_text, soft_card_section


def test_load_eval_metrics_keeps_numbers_sorted_by_exit(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"exits": {"12": {"loss": 2, "ok": True, "text": "x"}, "9": {"loss": 3.5}}}))
    assert load_eval_metrics(tmp_path) == {9: {"loss": 3.5}, 12: {"loss": 2}}


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), ("{", "not a `soft-peft eval` metrics.json"), ('{"model": "m"}', "no per-exit metrics")],
)
def test_load_eval_metrics_names_the_file(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_eval_metrics(path)
    assert str(path) in str(error.value)


def test_card_metadata_and_untrained_exit_flag():
    section = soft_card_section(
        num_layers=3, num_parameters=1000, source="runs/x", base_model="HuggingFaceTB/SmolLM2-135M",
        license=None, exits_trained=[2, 4], source_layers=4, source_parameters=2000,
    )  # fmt: skip
    assert "| parameters | 1,000 (50% of the source) |" in section
    assert "3 is not one of them: this sub-model was not trained as one" in section
    card = ModelCard(model_card_text("t", None, "HuggingFaceTB/SmolLM2-135M", section))
    assert card.data.license == "other" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "soft-peft" in card.data.tags
    # A local base model is named in the text but not in the Hub metadata
    assert ModelCard(model_card_text("t", "mit", "./runs/base", section)).data.base_model is None


def test_training_card_has_trls_card_and_the_soft_section(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    data = Dataset.from_list([{"prompt": f"{a}+1=", "completion": f"{a + 1}."} for a in range(8)])
    args = SoFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, exit_layers=[2, 4],
    )  # fmt: skip
    trainer = SoFTTrainer(model=str(base), args=args, train_dataset=data)
    trainer.train()
    trainer.create_model_card(model_name="run")
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.license == "apache-2.0" and {"soft-peft", "trl"} <= set(card.data.tags)
    assert "## Sorted Fine-Tuning (SoFT)" in card.text and "| SoFT exits trained | 2, 4 |" in card.text
    assert "| depth | 4 decoder layers |" in card.text
    # A local base is named by its folder only, in TRL's line too: the card must not publish this machine's paths
    assert "| base model | `base` |" in card.text and "fine-tuned version of a local model" in card.text
    assert str(tmp_path) not in card.text and "huggingface.co/None" not in card.text
    parameters = trainer.model.num_parameters()
    assert f"| parameters | {parameters:,} |" in card.text
    assert card.text.count("## Sorted Fine-Tuning (SoFT)") == 1
