"""`SoFTTrainer` end to end on tiny models: parity with `SFTTrainer`, per-exit metrics, checkpoints, LoRA, errors."""

import copy
import itertools
import json
import shutil

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from tiny_models import NUM_LAYERS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from soft_peft import SoFTConfig, SoFTTrainer, SortedLossWrapper


def arithmetic(n=64):
    return Dataset.from_list(
        [{"prompt": f"{a}+{b}=", "completion": f"{a + b}."} for a in range(8) for b in range(8)][:n]
    )


def conversations(n=48):
    rows = []
    for a in range(n):
        rows.append(
            {"messages": [{"role": "user", "content": f"x{a % 7}"}, {"role": "assistant", "content": f"y{a % 7}"}]}
        )
    return Dataset.from_list(rows)


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
    )
    values.update(overrides)
    return SoFTConfig(**values)


def first_and_last(history, key):
    values = [entry[key] for entry in history if key in entry]
    return values[0], values[-1]


def test_single_exit_loss_equals_sft_trainer_loss(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    sft_args = SFTConfig(
        output_dir=str(tmp_path / "sft"), report_to="none", use_cpu=True, per_device_train_batch_size=8
    )
    sft = SFTTrainer(model=copy.deepcopy(model), args=sft_args, train_dataset=arithmetic(), processing_class=tokenizer)
    soft = SoFTTrainer(
        model=copy.deepcopy(model),
        args=config(tmp_path, exit_layers=[NUM_LAYERS], per_device_train_batch_size=8),
        train_dataset=arithmetic(),
        processing_class=tokenizer,
    )
    inputs = next(iter(sft.get_train_dataloader()))
    for num_items in (None, 37):
        expected = sft.compute_loss(sft.model, dict(inputs), num_items_in_batch=num_items)
        got = soft.compute_loss(soft.model, dict(inputs), num_items_in_batch=num_items)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # SFTTrainer's own metrics keep their meaning (last layer)
    assert soft._metrics["train"]["mean_token_accuracy"] == pytest.approx(sft._metrics["train"]["mean_token_accuracy"])
    assert soft._metrics["train"]["entropy"] == pytest.approx(sft._metrics["train"]["entropy"], rel=1e-4)


def test_prompt_completion_training_lowers_every_exit_and_reloads(tmp_path):
    tokenizer = tiny_tokenizer()
    args = config(tmp_path, eval_strategy="steps", eval_steps=20, save_strategy="steps", save_steps=40)
    trainer = SoFTTrainer(
        model=tiny_model("qwen2"),
        args=args,
        train_dataset=arithmetic(),
        eval_dataset=arithmetic(16),
        processing_class=tokenizer,
    )
    assert trainer.exit_layers == [1, 2, 3, 4]
    trainer.train()
    history = trainer.state.log_history
    for k in trainer.exit_layers:
        first, last = first_and_last(history, f"exit_{k}/loss")
        assert last < first - 0.3, (k, first, last)
        assert f"exit_{k}/mean_token_accuracy" in history[0]
        assert any(f"eval_exit_{k}/loss" in entry for entry in history)
    assert "loss" in history[0] and "mean_token_accuracy" in history[0]

    checkpoint = tmp_path / "out" / "checkpoint-40"
    assert json.loads((checkpoint / "config.json").read_text())["soft_exit_layers"] == [1, 2, 3, 4]
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert reloaded.config.soft_exit_layers == [1, 2, 3, 4]


def test_conversational_assistant_only_loss(tmp_path):
    args = config(tmp_path, assistant_only_loss=True, exit_layers="2,4", exit_loss_weights="linear")
    trainer = SoFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=conversations(), processing_class=tiny_tokenizer()
    )
    batch = next(iter(trainer.get_train_dataloader()))
    # only the assistant reply (and its end token) is trained
    assert 0 < (batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 2
    trainer.train()
    for k in (2, 4):
        first, last = first_and_last(trainer.state.log_history, f"exit_{k}/loss")
        assert last < first - 0.3


def per_sequence_reference(model, batch, exit_layers):
    """Each exit's mean loss and accuracy, with every sequence of the packed row run alone (no packing at all)."""
    input_ids, labels, position_ids = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = [*torch.nonzero(position_ids == 0).flatten().tolist(), input_ids.numel()]
    nll_sums, correct = dict.fromkeys(exit_layers, 0.0), dict.fromkeys(exit_layers, 0)
    num_tokens = 0
    for start, end in itertools.pairwise(starts):
        with torch.no_grad():
            outputs = model(input_ids=input_ids[None, start:end], output_hidden_states=True, soft_exit_loss=False)
        targets = labels[start + 1 : end]  # (T - 1,) the next token of each position
        mask = targets != -100
        num_tokens += int(mask.sum())
        for k in exit_layers:
            if k == NUM_LAYERS:
                logits = outputs.logits[0]
            else:
                logits = model.lm_head(model.model.norm(outputs.hidden_states[k][0]))  # (T, V)
            logits = logits[:-1][mask].float()
            nll_sums[k] += torch.nn.functional.cross_entropy(logits, targets[mask], reduction="sum").item()
            correct[k] += int((logits.argmax(-1) == targets[mask]).sum())
    return {k: (nll_sums[k] / num_tokens, correct[k] / num_tokens) for k in exit_layers}


@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_packing_and_padding_free_log_the_per_sequence_losses_and_tokens(tmp_path, mode):
    """Packed rows carry `position_ids` and no attention mask: the logged per-exit losses and accuracies equal each
    sequence run alone, and `num_tokens` counts the packed row's tokens."""
    extra = {"packing": True, "max_length": 64} if mode == "packing" else {"padding_free": True, "max_length": None}
    trainer = SoFTTrainer(
        model=tiny_model("llama"),
        args=config(tmp_path, max_steps=1, exit_layers=[2, NUM_LAYERS], **extra),
        train_dataset=arithmetic(),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert "position_ids" in batch and "attention_mask" not in batch
    assert batch["input_ids"].size(0) == 1 and int((batch["position_ids"] == 0).sum()) > 1  # several sequences
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    reference = per_sequence_reference(trainer.model, batch, [2, NUM_LAYERS])
    metrics = trainer._metrics["train"]
    for k, (exit_loss, accuracy) in reference.items():
        assert metrics[f"exit_{k}/loss"] == [pytest.approx(exit_loss, rel=1e-5)]
        assert metrics[f"exit_{k}/mean_token_accuracy"] == [pytest.approx(accuracy, abs=1e-6)]
    # The default weights ("last:0.75"): the last exit 3/4, the one early exit 1/4
    assert loss.item() == pytest.approx(0.25 * reference[2][0] + 0.75 * reference[NUM_LAYERS][0], rel=1e-5)
    assert metrics["num_tokens"] == [batch["position_ids"].size(1)]


def test_plain_sft_config_is_accepted(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2, learning_rate=1e-3)
    trainer = SoFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
    )
    assert trainer.args is args and trainer.args.learning_rate == 1e-3  # kept as is, never converted
    assert trainer.exit_layers == [1, 2, 3, 4]


def test_lora_trains_exits_and_adapter_reproduces_losses(tmp_path):
    tokenizer = tiny_tokenizer()
    base = tiny_model("llama")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    args = config(tmp_path, exit_layers=[2, 4], learning_rate=1e-2)
    trainer = SoFTTrainer(
        model=copy.deepcopy(base), args=args, train_dataset=arithmetic(), processing_class=tokenizer, peft_config=lora
    )
    head = trainer.model.get_base_model().get_output_embeddings()
    assert not head.weight.requires_grad  # the shared head stays frozen by default
    trainer.train()
    for k in (2, 4):
        first, last = first_and_last(trainer.state.log_history, f"exit_{k}/loss")
        assert last < first - 0.2
    trainer.save_model(str(tmp_path / "adapter"))

    inputs = next(iter(trainer.get_train_dataloader()))
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()  # no bf16 autocast
    with torch.no_grad():
        expected = trained(**inputs, soft_exit_loss=True).exit_losses
        restored = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
        got = SortedLossWrapper(restored, exit_layers=[2, 4])(**inputs).exit_losses
    for k in (2, 4):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)


def test_lora_can_train_the_head_with_modules_to_save(tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"], task_type="CAUSAL_LM")
    trainer = SoFTTrainer(
        model=tiny_model("llama"),
        args=config(tmp_path, max_steps=3),
        train_dataset=arithmetic(),
        processing_class=tiny_tokenizer(),
        peft_config=lora,
    )
    head = trainer.model.get_base_model().get_output_embeddings()
    before = head.weight.detach().clone()
    trainer.train()
    assert head.weight.requires_grad and not torch.equal(head.weight, before)


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        ({"exit_layers": [2, 9]}, {}, "4 decoder layers"),
        ({}, {"compute_loss_func": lambda *a, **k: 0}, "compute_loss_func"),
    ],
)
def test_bad_settings_raise(tmp_path, overrides, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoFTTrainer(
            model=tiny_model("llama"),
            args=config(tmp_path, **overrides),
            train_dataset=arithmetic(),
            processing_class=tiny_tokenizer(),
            **kwargs,
        )


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """2 micro-batches of 2 with accumulation take the same optimizer step as 1 batch of 4 (SGD, so scale matters)."""
    weights = {}
    for name, (batch_size, accumulation) in {"full": (4, 1), "accumulated": (2, 2)}.items():
        args = config(
            tmp_path / name,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
            bf16=False,
            exit_layers=[2, 4],
            exit_loss_weights="linear",
        )
        trainer = SoFTTrainer(
            model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
        )
        trainer.train()
        weights[name] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    moved = 0
    for key, value in weights["full"].items():
        torch.testing.assert_close(weights["accumulated"][key], value, rtol=1e-4, atol=1e-6, msg=key)
        moved += int(not torch.equal(value, tiny_model("llama").state_dict()[key]))
    assert moved > 0


def test_self_distillation_logs_agreement_with_the_last_exit(tmp_path):
    args = config(
        tmp_path,
        max_steps=2,
        logging_steps=1,
        exit_layers=[2, NUM_LAYERS],
        exit_loss_weights="last:0.5",
        exit_head_grad="last",
        exit_distill_weight=0.5,
    )
    trainer = SoFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "exit_2/agreement" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert 0.0 <= entry["exit_2/agreement"] <= 1.0 and entry["exit_2/distill_loss"] > 0
        assert f"exit_{NUM_LAYERS}/agreement" not in entry
    # The logged agreement is the forward's own: recompute it on one batch
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
        outputs = trainer.model(**inputs, soft_exit_loss=True)
    assert trainer._metrics["train"]["exit_2/agreement"] == [pytest.approx(outputs.exit_agreement[2].item())]


@pytest.mark.parametrize("resume", ["path", "latest", "latest past a partial checkpoint"])
def test_a_resumed_run_continues_the_num_tokens_count(tmp_path, capsys, resume):
    """TRL keeps `num_tokens` on the trainer only (a resumed `SFTTrainer` counts from 0 again); SoFTTrainer saves it
    with each checkpoint and restores it, so the resumed run logs what the uninterrupted one logs. `True` resumes from
    the newest complete checkpoint, as `soft-peft train --resume_from_checkpoint` does: `Trainer` would pick a newer
    one that a kill cut off while saving, and fail."""

    def trainer(output_dir):
        args = config(
            tmp_path, output_dir=str(output_dir), max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2
        )
        return SoFTTrainer(
            model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
        )

    full = trainer(tmp_path / "full")
    full.train()
    expected = {entry["step"]: entry["num_tokens"] for entry in full.state.log_history if "num_tokens" in entry}
    assert expected[4] > expected[3] > expected[2] > 0
    # A run stopped after its checkpoint of step 2 (what remains of a crash), then resumed by a new trainer
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", crashed / "checkpoint-2")
    if resume == "latest past a partial checkpoint":  # killed while saving step 3: its last files never written
        partial = shutil.copytree(tmp_path / "full" / "checkpoint-4", crashed / "checkpoint-3")
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (partial / name).unlink()
    resumed = trainer(crashed)
    resumed.train(resume_from_checkpoint=str(crashed / "checkpoint-2") if resume == "path" else True)
    got = {entry["step"]: entry["num_tokens"] for entry in resumed.state.log_history if "num_tokens" in entry}
    assert got == expected
    if resume == "latest past a partial checkpoint":
        skipped = "checkpoint-3 is incomplete (no trainer_state.json); resuming from checkpoint-2"
        assert skipped in capsys.readouterr().out


def test_resuming_the_latest_checkpoint_without_a_complete_one_is_refused(tmp_path):
    args = config(tmp_path, max_steps=2)
    (tmp_path / "out" / "checkpoint-1").mkdir(parents=True)  # cut off before its trainer_state.json
    trainer = SoFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=arithmetic(), processing_class=tiny_tokenizer()
    )
    with pytest.raises(ValueError, match="nothing to resume in .*checkpoint-1 is incomplete"):
        trainer.train(resume_from_checkpoint=True)
