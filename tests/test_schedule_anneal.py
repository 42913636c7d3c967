"""Exit anneal (`exit_anneal_fraction`, `exit_anneal_floor`): hand-computed weights alone and with the late start,
ramp and rotation, validation, off = today's loss bit for bit, loss and gradients against a plain reference, the
trainer's logged weights, and an interrupted run resumed exactly."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_schedule import DEFAULT4, EXITS, REAL_LOSS, UNIFORM4, StopAt, tiny_trainer
from test_wrapper import batch, reference_exit_losses
from tiny_models import NUM_LAYERS, tiny_model

import soft_peft.exit_forward
from soft_peft import SoFTConfig, SortedLossWrapper
from soft_peft.schedule import ExitSchedule, scheduled_exit_weights

HALF = ExitSchedule(anneal_fraction=0.5)  # T = 10: start = 5, a(s) = 1 - (s + 1 - 5) / 5 from step 5
HALF_FLOOR = ExitSchedule(anneal_fraction=0.5, anneal_floor=0.5)  # a(s) = 0.5 + 0.5 * (1 - (s + 1 - 5) / 5)


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        # Before the anneal (s + 1 <= start): the base weights
        (HALF, 0, UNIFORM4),
        (HALF, 4, UNIFORM4),
        # Mid-anneal: a(5) = 0.8, early 0.25 * 0.8, the deepest 1 - 0.6
        (HALF, 5, [0.2, 0.2, 0.2, 0.4]),
        (HALF, 7, [0.1, 0.1, 0.1, 0.7]),  # a(7) = 0.4
        # The last step gets exactly the floor: 0 = plain SFT on the deepest exit; later steps stay there
        (HALF, 9, [0, 0, 0, 1]),
        (HALF, 15, [0, 0, 0, 1]),
        (HALF_FLOOR, 5, [0.225, 0.225, 0.225, 0.325]),  # a(5) = 0.9
        (HALF_FLOOR, 9, [0.125, 0.125, 0.125, 0.625]),  # a(9) = 0.5, the floor
        # A start between steps: f = 0.25 gives start 7.5, so step 6 (7 <= 7.5) is whole and step 7 has a = 0.8
        (ExitSchedule(anneal_fraction=0.25), 6, UNIFORM4),
        (ExitSchedule(anneal_fraction=0.25), 7, [0.2, 0.2, 0.2, 0.4]),
        # Rotation after the anneal: at step 5 exit index (5 * 1) % 3 = 2 is active, 0.2 x 3
        (ExitSchedule(rotation=1, anneal_fraction=0.5), 5, [0, 0, 0.6, 0.4]),
        (ExitSchedule(rotation=1, anneal_fraction=0.5), 9, [0, 0, 0, 1]),
        # Late start: plain SFT first; the anneal counts absolute steps (a(6) = 0.6), the rotation from the start
        (ExitSchedule(start_steps=3, anneal_fraction=0.5), 2, [0, 0, 0, 1]),
        (ExitSchedule(start_steps=3, anneal_fraction=0.5), 6, [0.15, 0.15, 0.15, 0.55]),
        (ExitSchedule(start_steps=3, rotation=1, anneal_fraction=0.5), 6, [0.45, 0, 0, 0.55]),
        # A ramp still running (factor 6/8, renormalised: early 0.1875 / 0.8125 each), then annealed by 0.8
        (
            ExitSchedule(ramp_steps=8, ramp_order="all", anneal_fraction=0.5),
            5,
            [0.15 / 0.8125] * 3 + [1 - 0.45 / 0.8125],
        ),
    ],
)
def test_annealed_weights_by_hand(schedule, step, expected):
    got = scheduled_exit_weights(UNIFORM4, step, schedule, total_steps=10)
    assert got == pytest.approx(expected)
    assert all(w == 0.0 for w, e in zip(got, expected, strict=True) if e == 0)  # exactly 0: skipped, not tiny


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ExitSchedule(anneal_fraction=-0.1), r"exit_anneal_fraction must be a number in \[0, 1\)"),
        (lambda: ExitSchedule(anneal_fraction=1.0), "exit_anneal_fraction must be"),
        (lambda: ExitSchedule(anneal_fraction=math.nan), "exit_anneal_fraction must be"),
        (lambda: ExitSchedule(anneal_fraction=math.inf), "exit_anneal_fraction must be"),
        (
            lambda: ExitSchedule(anneal_fraction=0.5, anneal_floor=1.5),
            r"exit_anneal_floor must be a number in \[0, 1\]",
        ),
        (lambda: ExitSchedule(anneal_fraction=0.5, anneal_floor=-0.5), "exit_anneal_floor must be"),
        (lambda: ExitSchedule(anneal_fraction=0.5, anneal_floor=math.nan), "exit_anneal_floor must be"),
        (lambda: ExitSchedule(anneal_floor=0.3), "set exit_anneal_fraction above 0"),
        (lambda: SoFTConfig("out", exit_anneal_floor=0.3, use_cpu=True, bf16=False), "exit_anneal_fraction"),
        (lambda: SoFTConfig("out", exit_anneal_fraction=2.0, use_cpu=True, bf16=False), "exit_anneal_fraction"),
        (lambda: scheduled_exit_weights(UNIFORM4, 3, HALF), "total_steps >= 1"),
        (lambda: scheduled_exit_weights(UNIFORM4, 3, HALF, total_steps=0), "total_steps >= 1"),
    ],
)
def test_bad_anneals_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_training_forward_without_the_total_steps_raises():
    wrapper = SortedLossWrapper(tiny_model(), exit_layers=EXITS, exit_anneal_fraction=0.5).train()
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="total_steps="):
        wrapper(input_ids=ids, attention_mask=mask, labels=labels, step=3)


def loss_and_grads(wrapper, **step):
    ids, mask, labels = batch()
    loss = wrapper(input_ids=ids, attention_mask=mask, labels=labels, **step).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in wrapper.model.named_parameters()}


def test_anneal_off_is_todays_loss_and_gradients_bit_for_bit():
    plain_loss, plain_grads = loss_and_grads(SortedLossWrapper(tiny_model("llama"), exit_layers=EXITS))
    off = SortedLossWrapper(tiny_model("llama"), exit_layers=EXITS, exit_anneal_fraction=0.0, exit_anneal_floor=0.0)
    off_loss, off_grads = loss_and_grads(off, step=9, total_steps=10)
    assert torch.equal(off_loss, plain_loss)
    assert all(torch.equal(off_grads[name], grad) for name, grad in plain_grads.items())


@pytest.mark.parametrize("step, floor", [(5, 0.0), (9, 0.5), (9, 0.0)])
def test_annealed_loss_and_gradients_match_a_plain_reference(step, floor):
    model = tiny_model("llama")
    wrapper = SortedLossWrapper(model, exit_layers=EXITS, exit_anneal_fraction=0.5, exit_anneal_floor=floor)
    out_loss, grads = loss_and_grads(wrapper, step=step, total_steps=10)
    model.zero_grad()
    ids, mask, labels = batch()
    # By hand: the default weights (1/12 x 3, 3/4) with the early ones times a(step) and the rest to the deepest
    factor = {5: 0.8, 9: floor}[step]
    weights = [factor / 12] * 3 + [1 - factor / 4]
    if factor == 0:  # only the deepest exit: plain SFT on the model's own logits
        logits = model(input_ids=ids, attention_mask=mask).logits
        ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    else:
        reference = reference_exit_losses(model, ids, mask, labels, EXITS)
        ref_loss = sum(w * reference[k] for k, w in zip(EXITS, weights, strict=True))
    ref_loss.backward()
    torch.testing.assert_close(out_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# The tiny trainer runs 4 steps: f = 0.5 starts the anneal at 2, a(2) = 0.5 and a(3) = floor = 0
ANNEALED4 = [DEFAULT4, DEFAULT4, [1 / 24] * 3 + [7 / 8], [0, 0, 0, 1]]


def train_recording(monkeypatch, output_dir, resume=None, callbacks=(), **overrides):
    """Train the tiny model with an anneal over the last half; the weights reaching the loss per call, the trainer."""
    calls = []

    def recording_loss(exit_hidden, *args, **kwargs):
        calls.append(list(kwargs["weights"]))
        return REAL_LOSS(exit_hidden, *args, **kwargs)

    monkeypatch.setattr(soft_peft.exit_forward, "sorted_exit_loss", recording_loss)
    trainer = tiny_trainer(output_dir, callbacks, **(dict(exit_anneal_fraction=0.5) | overrides))
    trainer.train(resume_from_checkpoint=resume)
    return calls, trainer


def test_trainer_anneals_over_max_steps_and_logs_the_weights(tmp_path, monkeypatch):
    calls, trainer = train_recording(monkeypatch, tmp_path / "run", save_strategy="no")
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    for step, expected in enumerate(ANNEALED4):
        # Both micro-batches of the step: the exits above 0 only (the last step projects the deepest exit alone)
        assert calls[2 * step] == calls[2 * step + 1] == pytest.approx([w for w in expected if w > 0])
        assert [logs[step + 1][f"exit_{k}/weight"] for k in EXITS] == pytest.approx(expected)
    assert not any(key.endswith("/loss") and key != f"exit_{NUM_LAYERS}/loss" for key in logs[4])


def test_an_interrupted_annealed_run_resumes_exactly(tmp_path, monkeypatch):
    straight_calls, straight = train_recording(monkeypatch, tmp_path / "straight")
    first_calls, _ = train_recording(monkeypatch, tmp_path / "interrupted", callbacks=[StopAt(2)])
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert checkpoint.is_dir() and not (tmp_path / "interrupted" / "checkpoint-4").exists()
    resumed_calls, resumed = train_recording(monkeypatch, tmp_path / "interrupted", resume=str(checkpoint))
    # The anneal is active in the steps after the resume (steps 2 and 3), and they replay the straight run's
    assert resumed_calls == [pytest.approx([w for w in ANNEALED4[s] if w > 0]) for s in (2, 2, 3, 3)]
    assert first_calls + resumed_calls == straight_calls
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The anneal reached the weights: the same run without it trains others
    _, plain = train_recording(monkeypatch, tmp_path / "plain", exit_anneal_fraction=0.0, save_strategy="no")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(straight.model.state_dict().values(), plain.model.state_dict().values(), strict=True)
    )
