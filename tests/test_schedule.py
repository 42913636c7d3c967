"""Exit curriculum (`soft_peft.schedule`): hand-computed weights, loss and gradient parity against a plain reference,
default off, reduction to SFT with one exit, and the trainer: same weights for every micro-batch of a step, logged,
and resumed exactly from a checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from test_wrapper import batch, reference_exit_losses
from tiny_models import NUM_LAYERS, tiny_model, tiny_tokenizer
from transformers import TrainerCallback

import soft_peft.exit_forward
import soft_peft.loss
from soft_peft import SoFTConfig, SoFTTrainer, SortedLossWrapper
from soft_peft.schedule import ExitSchedule, scheduled_exit_weights

UNIFORM4 = [0.25] * 4
REAL_LOSS = soft_peft.exit_forward.sorted_exit_loss
EXITS = [1, 2, 3, NUM_LAYERS]
DEFAULT4 = [1 / 12, 1 / 12, 1 / 12, 3 / 4]  # the default "last:0.75" on EXITS: the early exits share 1/4


def schedule_settings(schedule: ExitSchedule) -> dict:
    """The SoFTSettings fields of a schedule."""
    return {
        "exit_ramp_steps": schedule.ramp_steps,
        "exit_ramp_order": schedule.ramp_order,
        "exit_rotation": schedule.rotation,
        "exit_start_steps": schedule.start_steps,
    }


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        # Ramp all early exits together over 4 steps: step 0 has factor 1/4, renormalised
        (ExitSchedule(ramp_steps=4, ramp_order="all"), 0, [1 / 7, 1 / 7, 1 / 7, 4 / 7]),
        (ExitSchedule(ramp_steps=4, ramp_order="all"), 3, UNIFORM4),
        (ExitSchedule(ramp_steps=4, ramp_order="all"), 50, UNIFORM4),
        # Deepest first over 6 steps: windows [0, 2), [2, 4), [4, 6) for exits 3, 2, 1
        (ExitSchedule(ramp_steps=6), 0, [0, 0, 1 / 3, 2 / 3]),
        (ExitSchedule(ramp_steps=6), 3, [0, 1 / 3, 1 / 3, 1 / 3]),
        (ExitSchedule(ramp_steps=6), 4, [0.125 / 0.875, 0.25 / 0.875, 0.25 / 0.875, 0.25 / 0.875]),
        (ExitSchedule(ramp_steps=6), 5, UNIFORM4),
        # Rotation of 1 of 3 early exits: weight x3 when active
        (ExitSchedule(rotation=1), 0, [0.75, 0, 0, 0.25]),
        (ExitSchedule(rotation=1), 4, [0, 0.75, 0, 0.25]),
        (ExitSchedule(rotation=2), 1, [0.375, 0, 0.375, 0.25]),
        (ExitSchedule(rotation=3), 1, UNIFORM4),  # every early exit: no rotation
        # Both: the ramp first (factor 2/4: [.2, .2, .2, .4]), then the rotation (exit 2 active, x3)
        (ExitSchedule(ramp_steps=4, ramp_order="all", rotation=1), 1, [0, 0.6, 0, 0.4]),
        # Late start: plain SFT before step 3, then the base weights
        (ExitSchedule(start_steps=3), 0, [0, 0, 0, 1]),
        (ExitSchedule(start_steps=3), 2, [0, 0, 0, 1]),
        (ExitSchedule(start_steps=3), 3, UNIFORM4),
        # ... and the ramp and the rotation count from the start: step 4 is their step 1
        (ExitSchedule(ramp_steps=4, ramp_order="all", rotation=1, start_steps=3), 4, [0, 0.6, 0, 0.4]),
        (ExitSchedule(rotation=1, start_steps=2), 2, [0.75, 0, 0, 0.25]),
    ],
)
def test_scheduled_weights_by_hand(schedule, step, expected):
    assert scheduled_exit_weights(UNIFORM4, step, schedule) == pytest.approx(expected)


@pytest.mark.parametrize("rotation", [1, 2])
def test_rotation_averages_to_the_base_weights_over_a_cycle(rotation):
    base = [0.1, 0.2, 0.3, 0.4]
    for first in range(5):
        cycle = [scheduled_exit_weights(base, first + s, ExitSchedule(rotation=rotation)) for s in range(3)]
        assert [sum(ws) / 3 for ws in zip(*cycle, strict=True)] == pytest.approx(base)
        assert all(sum(w > 0 for w in ws[:-1]) == rotation for ws in cycle)


def test_constant_schedule_and_single_exit_keep_the_weights():
    for step in (0, 7, 1000):
        assert scheduled_exit_weights(UNIFORM4, step, None) == UNIFORM4
        assert scheduled_exit_weights(UNIFORM4, step, ExitSchedule()) == UNIFORM4
        assert scheduled_exit_weights([1.0], step, ExitSchedule(ramp_steps=9, rotation=1)) == [1.0]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ExitSchedule(ramp_steps=-1), "exit_ramp_steps"),
        (lambda: ExitSchedule(ramp_order="shallow"), "exit_ramp_order"),
        (lambda: ExitSchedule(rotation=-2), "exit_rotation"),
        (lambda: ExitSchedule(start_steps=-1), "exit_start_steps"),
        (lambda: SoFTConfig("out", exit_start_steps=-5, use_cpu=True, bf16=False), "exit_start_steps"),
        (lambda: scheduled_exit_weights(UNIFORM4, -1, ExitSchedule(rotation=1)), "step must be >= 0"),
        # The deepest exit at weight 0 and the first exits to ramp in at weight 0: nothing to train at step 0
        (lambda: scheduled_exit_weights([1.0, 0.0, 0.0], 0, ExitSchedule(ramp_steps=4)), "deepest exit"),
        (
            lambda: SortedLossWrapper(
                tiny_model(), exit_layers=[1, 2, 4], exit_loss_weights=[1, 0, 0], exit_ramp_steps=3
            ),
            "deepest",
        ),
        (lambda: SoFTConfig("out", exit_rotation=-1, use_cpu=True, bf16=False), "exit_rotation"),
    ],
)
def test_bad_schedules_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_rotation_with_nothing_to_rotate_warns_unless_the_last_exit_is_alone(recwarn):
    with pytest.warns(UserWarning, match=r"exit_rotation=3 is not below the 3 early exits of \[1, 2, 3, 4\]"):
        SortedLossWrapper(tiny_model(), exit_layers=[1, 2, 3, 4], exit_rotation=3)
    SortedLossWrapper(tiny_model(), exit_layers=[1, 2, 3, 4], exit_rotation=2)  # rotates: no warning
    SortedLossWrapper(tiny_model(), exit_layers=[NUM_LAYERS], exit_rotation=2)  # plain SFT: no warning
    assert not [w for w in recwarn if "exit_rotation" in str(w.message)]


def test_training_forward_without_a_step_raises():
    wrapper = SortedLossWrapper(tiny_model(), exit_layers=EXITS, exit_rotation=1).train()
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="soft_exit_step"):
        wrapper(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("step", [0, 1, 5])
def test_scheduled_loss_and_gradients_match_reference_and_skip_inactive_exits(step, monkeypatch):
    schedule = ExitSchedule(ramp_steps=4, ramp_order="all", rotation=1)
    weights = scheduled_exit_weights(UNIFORM4, step, schedule)
    active = [k for k, w in zip(EXITS, weights, strict=True) if w > 0]
    assert len(active) == 2
    head_calls = []
    real_kernel = soft_peft.loss.chunked_cross_entropy
    monkeypatch.setattr(
        soft_peft.loss, "chunked_cross_entropy", lambda *a, **k: head_calls.append(1) or real_kernel(*a, **k)
    )
    model = tiny_model("llama")
    ids, mask, labels = batch()
    out = SortedLossWrapper(model, exit_layers=EXITS, exit_loss_weights=[1, 2, 3, 4], **schedule_settings(schedule))(
        input_ids=ids, attention_mask=mask, labels=labels, step=step
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    weights = scheduled_exit_weights([0.1, 0.2, 0.3, 0.4], step, schedule)
    reference = reference_exit_losses(model, ids, mask, labels, EXITS)
    ref_loss = sum(w * reference[k] for k, w in zip(EXITS, weights, strict=True))
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(out.exit_losses) == active and len(head_calls) == len(active)
    assert out.exit_weights == pytest.approx(dict(zip(EXITS, weights, strict=True)))


def test_default_schedule_is_todays_loss_exactly():
    ids, mask, labels = batch()
    plain = SortedLossWrapper(tiny_model(), exit_layers=EXITS, exit_loss_weights=[1, 0, 1, 1])
    expected = plain(input_ids=ids, attention_mask=mask, labels=labels)
    scheduled = SortedLossWrapper(
        tiny_model(), exit_layers=EXITS, exit_loss_weights=[1, 0, 1, 1], **schedule_settings(ExitSchedule())
    )
    got = scheduled(input_ids=ids, attention_mask=mask, labels=labels, step=3)
    assert torch.equal(got.loss, expected.loss)
    assert list(got.exit_losses) == EXITS  # a zero base weight is still computed and reported, as before


@pytest.mark.parametrize(
    "schedule",
    [ExitSchedule(ramp_steps=5), ExitSchedule(ramp_steps=5, ramp_order="all"), ExitSchedule(ramp_steps=3, rotation=2)],
)
def test_last_exit_alone_is_plain_sft_under_every_schedule(schedule):
    model = tiny_model("llama")
    ids, mask, labels = batch()
    wrapper = SortedLossWrapper(model, exit_layers=[NUM_LAYERS], **schedule_settings(schedule))
    logits = model(input_ids=ids, attention_mask=mask).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    for step in (0, 2, 40):
        got = wrapper(input_ids=ids, attention_mask=mask, labels=labels, step=step).loss
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def arithmetic():
    return Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b}."} for a in range(8) for b in range(8)])


class StopAt(TrainerCallback):
    """Stops training after `step` (the checkpoint of that step is still written): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def tiny_trainer(output_dir, callbacks=(), **overrides) -> SoFTTrainer:
    """A SoFTTrainer of the tiny Llama on `arithmetic()`: 4 steps of 2 micro-batches of 2 rows, a checkpoint every 2
    steps, exits 1, 2, 3 and 4; `overrides` are SoFTConfig fields."""
    values = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        seed=0,
        exit_layers=EXITS,
    )
    return SoFTTrainer(
        model=tiny_model("llama"),
        args=SoFTConfig(**(values | overrides)),
        train_dataset=arithmetic(),
        processing_class=tiny_tokenizer(),
        callbacks=list(callbacks),
    )


def train_recording(monkeypatch, output_dir, resume=None, callbacks=(), **overrides):
    """Train a tiny model with a schedule; the weights that reach the loss at each call, and the per-step logs."""
    calls = []

    def recording_loss(exit_hidden, *args, **kwargs):
        calls.append((len(exit_hidden), list(kwargs["weights"])))
        return REAL_LOSS(exit_hidden, *args, **kwargs)

    monkeypatch.setattr(soft_peft.exit_forward, "sorted_exit_loss", recording_loss)
    overrides = dict(exit_ramp_steps=3, exit_ramp_order="all", exit_rotation=1) | overrides
    trainer = tiny_trainer(output_dir, callbacks, **overrides)
    trainer.train(resume_from_checkpoint=resume)
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    return calls, logs


def test_trainer_follows_the_global_step_under_accumulation_and_logs_weights(tmp_path, monkeypatch):
    calls, logs = train_recording(monkeypatch, tmp_path / "run")
    assert len(calls) == 8  # 4 steps x 2 micro-batches
    for step in range(4):
        expected = scheduled_exit_weights(DEFAULT4, step, ExitSchedule(ramp_steps=3, ramp_order="all", rotation=1))
        # Both micro-batches of one optimizer step: the same active exits and weights
        assert calls[2 * step] == calls[2 * step + 1] == (2, pytest.approx([w for w in expected if w > 0]))
        entry = logs[step + 1]
        assert [entry[f"exit_{k}/weight"] for k in EXITS] == pytest.approx(expected)
        trained = [k for k, w in zip(EXITS, expected, strict=True) if w > 0]
        assert sorted(int(key[5:].split("/")[0]) for key in entry if key.endswith("/loss")) == trained


def test_resume_from_a_checkpoint_replays_the_schedule_exactly(tmp_path, monkeypatch):
    straight_calls, straight_logs = train_recording(monkeypatch, tmp_path / "straight")
    first_calls, _ = train_recording(monkeypatch, tmp_path / "interrupted", callbacks=[StopAt(2)])
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert checkpoint.is_dir() and not (tmp_path / "interrupted" / "checkpoint-4").exists()
    resumed_calls, resumed_logs = train_recording(monkeypatch, tmp_path / "interrupted", resume=str(checkpoint))

    assert first_calls + resumed_calls == straight_calls
    for step in (3, 4):
        for key, value in straight_logs[step].items():
            if key.startswith("exit_") or key == "loss":
                assert resumed_logs[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
        assert {k for k in resumed_logs[step] if k.startswith("exit_")} == {
            k for k in straight_logs[step] if k.startswith("exit_")
        }


def test_default_config_logs_its_weights_once_and_trains_every_exit(tmp_path, monkeypatch):
    calls, logs = train_recording(
        monkeypatch, tmp_path / "run", exit_ramp_steps=0, exit_rotation=0, max_steps=2, save_strategy="no"
    )
    assert calls == [(4, pytest.approx(DEFAULT4))] * 4
    # The constant weights are reported once, in the first training log, not at every step
    first = min(logs)
    assert [logs[first][f"exit_{k}/weight"] for k in EXITS] == pytest.approx(DEFAULT4)
    assert not any(key.endswith("/weight") for step, entry in logs.items() if step != first for key in entry)
