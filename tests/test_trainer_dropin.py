"""`SoFTTrainer` as a drop-in `SFTTrainer`: the user's config object, positional arguments, metrics callbacks, MoE
router losses and architectures whose final norm has an unusual name (LFM2)."""

import copy
import dataclasses

import pytest
import torch
from accelerate.parallelism_config import ParallelismConfig
from datasets import Dataset
from tiny_models import NUM_LAYERS, tiny_model, tiny_tokenizer
from trl import SFTConfig, SFTTrainer

from soft_peft import SoFTConfig, SoFTSettings, SoFTTrainer


def arithmetic(n=64):
    return Dataset.from_list(
        [{"prompt": f"{a}+{b}=", "completion": f"{a + b}."} for a in range(8) for b in range(8)][:n]
    )


def sft_config(tmp_path, cls=SFTConfig, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    values.update(overrides)
    return cls(**values)


@dataclasses.dataclass
class ScriptConfig(SFTConfig):
    """A user's own config subclass with an extra option, as training scripts have."""

    my_option: int = 3


def test_the_users_sft_config_is_kept_as_is(tmp_path):
    parallelism = ParallelismConfig()
    args = sft_config(tmp_path, parallelism_config=parallelism, learning_rate=1e-3)
    trainer = SoFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
    )
    assert trainer.args is args and args.parallelism_config is parallelism
    assert trainer.soft_settings == SoFTSettings()  # a plain SFTConfig gets the SoFT defaults
    assert trainer.exit_layers == [1, 2, 3, 4]


def test_model_init_kwargs_are_left_untouched(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model_init_kwargs = {"dtype": torch.float32}
    args = sft_config(tmp_path, model_init_kwargs=model_init_kwargs)
    trainer = SoFTTrainer(model=str(folder), args=args, train_dataset=arithmetic())
    assert args.model_init_kwargs is model_init_kwargs and model_init_kwargs == {"dtype": torch.float32}
    assert trainer.model.dtype == torch.float32


def test_a_config_subclass_with_extra_fields_works(tmp_path):
    args = sft_config(tmp_path, cls=ScriptConfig, my_option=7)
    trainer = SoFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
    )
    assert trainer.args is args and trainer.args.my_option == 7
    trainer.train()
    assert "exit_4/loss" in trainer.state.log_history[0]


def test_soft_settings_are_read_from_a_soft_config_and_checked_for_any_config(tmp_path):
    args = sft_config(tmp_path, cls=SoFTConfig, exit_layers="2, 4", exit_loss_weights="1,3")
    trainer = SoFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
    )
    assert trainer.args is args and trainer.exit_layers == [2, 4]
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        SoFTTrainer(model=tiny_model("llama"), args=sft_config(tmp_path, label_smoothing_factor=0.1))


def test_positional_arguments_are_bound_as_sft_trainer_binds_them(tmp_path):
    args, data, tokenizer = sft_config(tmp_path), arithmetic(), tiny_tokenizer()

    def my_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.sum()

    with pytest.raises(ValueError, match="compute_loss_func"):
        SoFTTrainer(tiny_model("llama"), args, None, data, None, None, my_loss)
    # model, args, data_collator, train_dataset, eval_dataset, processing_class
    trainer = SoFTTrainer(tiny_model("llama"), args, None, data, None, tokenizer)
    assert trainer.processing_class is tokenizer and trainer.train_dataset is not None


def test_compute_metrics_and_preprocess_logits_work_as_in_sft_trainer(tmp_path):
    """With the last layer as the only exit, evaluation gives SFTTrainer's numbers, custom metrics included."""

    def preprocess(logits, labels):
        return logits.argmax(-1)  # (B, T)

    def accuracy(prediction):
        predictions, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
        mask = labels != -100
        return {
            "next_token_accuracy": float((predictions[mask] == labels[mask]).mean()),
            "mean_predicted_id": float(predictions[mask].mean()),  # non-zero, and depends on every logit's argmax
        }

    model, tokenizer, results = tiny_model("llama"), tiny_tokenizer(), {}
    for trainer_cls, args_cls in ((SFTTrainer, SFTConfig), (SoFTTrainer, SoFTConfig)):
        extra = {"exit_layers": [NUM_LAYERS]} if args_cls is SoFTConfig else {}
        args = sft_config(tmp_path / args_cls.__name__, cls=args_cls, per_device_eval_batch_size=8, **extra)
        trainer = trainer_cls(
            model=copy.deepcopy(model),
            args=args,
            train_dataset=arithmetic(),
            eval_dataset=arithmetic(16),
            processing_class=tokenizer,
            compute_metrics=accuracy,
            preprocess_logits_for_metrics=preprocess,
        )
        results[trainer_cls] = trainer.evaluate()
    sft, soft = results[SFTTrainer], results[SoFTTrainer]
    assert soft["eval_next_token_accuracy"] == pytest.approx(sft["eval_next_token_accuracy"])
    assert 0 < soft["eval_mean_predicted_id"] == pytest.approx(sft["eval_mean_predicted_id"])
    assert soft["eval_loss"] == pytest.approx(sft["eval_loss"], rel=1e-5)
    assert "eval_exit_4/loss" in soft


@pytest.mark.parametrize("arch", ["lfm2", "qwen3_moe", "mixtral"])
def test_last_exit_loss_equals_sft_trainer_and_the_models_own_loss(tmp_path, arch):
    """LFM2 (final norm `embedding_norm`) and MoE models with TRL's default router load-balancing loss."""
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    own_model = copy.deepcopy(model)
    sft = SFTTrainer(
        model=copy.deepcopy(model), args=sft_config(tmp_path / "sft"), train_dataset=arithmetic(),
        processing_class=tokenizer,
    )  # fmt: skip
    soft = SoFTTrainer(
        model=copy.deepcopy(model), args=sft_config(tmp_path / "soft", cls=SoFTConfig, exit_layers=[NUM_LAYERS]),
        train_dataset=arithmetic(), processing_class=tokenizer,
    )  # fmt: skip
    moe = arch != "lfm2"
    assert sft.aux_loss_enabled == soft.aux_loss_enabled == moe
    inputs = next(iter(sft.get_train_dataloader()))
    # Set by `Trainer.train` for each accumulation cycle; the summed-loss case divides the aux loss by it
    sft.current_gradient_accumulation_steps = soft.current_gradient_accumulation_steps = 2
    for num_items in (None, 37):
        expected = sft.compute_loss(sft.model, dict(inputs), num_items_in_batch=num_items)
        got = soft.compute_loss(soft.model, dict(inputs), num_items_in_batch=num_items)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        own = own_model(**inputs, output_router_logits=True) if moe else own_model(**inputs)
    torch.testing.assert_close(soft.compute_loss(soft.model, dict(inputs)), own.loss, rtol=1e-5, atol=1e-6)
    if moe:
        assert own.aux_loss > 0
        # Logged under "eval": tiny models are in eval mode; 3 calls each
        logged = soft._metrics["eval"]["aux_loss"]
        assert len(logged) == 3 and logged[:2] == pytest.approx(sft._metrics["eval"]["aux_loss"])
        assert logged[0] == pytest.approx(own.aux_loss.item())


@pytest.mark.parametrize("arch", ["lfm2", "qwen3_moe"])
def test_trains_every_exit(tmp_path, arch):
    args = sft_config(tmp_path, cls=SoFTConfig, max_steps=30, learning_rate=3e-3, logging_steps=10)
    trainer = SoFTTrainer(
        model=tiny_model(arch), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
    )
    trainer.train()
    history = trainer.state.log_history
    for k in trainer.exit_layers:
        losses = [entry[f"exit_{k}/loss"] for entry in history if f"exit_{k}/loss" in entry]
        assert losses[-1] < losses[0] - 0.3, (k, losses)
    assert ("aux_loss" in history[0]) == (arch != "lfm2")
