"""LayerSkip's layer dropout (`soft_peft.layer_dropout`): the rates by hand, the realised drop frequency per layer
against them (a binomial test), a dropped layer is the identity for that sample and gets no gradient from it (against
a plain model without that layer), rate 0 is plain training bit for bit, nothing is dropped in evaluation or
generation, draws follow the step (and resume exactly), and the checkpoint stays a vanilla model."""

import math

import pytest
import torch
from test_schedule import StopAt, tiny_trainer
from test_wrapper import batch
from tiny_models import NUM_LAYERS, tiny_model
from transformers import AutoModelForCausalLM

from soft_peft import SoFTConfig, SortedLossWrapper
from soft_peft.layer_dropout import LayerDropout, layer_dropout_state, realised_drop_rates
from soft_peft.model_layout import get_decoder_layers


def test_rates_by_hand():
    # Layer index l = 0..3 of 4: position l / 3
    exp = LayerDropout(0.2).layer_rates(4, step=0)
    assert exp == pytest.approx([0.2 * (2 ** (index / 3) - 1) for index in range(4)])
    assert exp[0] == 0 and exp[-1] == pytest.approx(0.2)
    assert LayerDropout(0.2, "linear").layer_rates(4, 0) == pytest.approx([0, 0.2 / 3, 0.4 / 3, 0.2])
    assert LayerDropout(0.2, "constant").layer_rates(4, 0) == pytest.approx([0.2] * 4)
    assert LayerDropout(0.0).layer_rates(4, 0) == [0.0] * 4
    # The time curriculum: 2 ** (t / T) - 1, from 0 at step 0 to the full rate at step T and after
    ramped = LayerDropout(0.2, "constant", ramp_steps=4)
    assert ramped.layer_rates(4, 0) == [0.0] * 4
    assert ramped.layer_rates(4, 2) == pytest.approx([0.2 * (math.sqrt(2) - 1)] * 4)
    assert ramped.layer_rates(4, 4) == ramped.layer_rates(4, 40) == pytest.approx([0.2] * 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rate=1.0), "in \\[0, 1\\)"),
        (dict(rate=-0.1), "in \\[0, 1\\)"),
        (dict(rate=0.1, scale="quadratic"), "layer_dropout_scale must be one of"),
        (dict(rate=0.1, ramp_steps=-1), "layer_dropout_ramp_steps"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerDropout(**kwargs)
    config_names = {"rate": "layer_dropout", "scale": "layer_dropout_scale", "ramp_steps": "layer_dropout_ramp_steps"}
    with pytest.raises(ValueError, match=message):
        SoFTConfig("out", use_cpu=True, **{config_names[k]: v for k, v in kwargs.items()})


def test_realised_drop_frequency_matches_the_configured_rates():
    model = tiny_model("llama")
    settings = LayerDropout(0.6, "exp")
    wrapper = SortedLossWrapper(model, layer_dropout=0.6, layer_dropout_scale="exp").train()
    ids = torch.randint(4, 100, (64, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(40):
            wrapper(input_ids=ids, labels=ids, step=step)
    realised, rates = realised_drop_rates(model), settings.layer_rates(NUM_LAYERS, 0)
    assert math.isnan(realised[0])  # rate 0: never drawn
    samples = 64 * 40
    for layer in range(1, NUM_LAYERS):
        # Binomial: 5 standard deviations (~0.04 here) fail on any shape or index error (rates differ by >= 0.15)
        bound = 5 * math.sqrt(rates[layer] * (1 - rates[layer]) / samples)
        assert abs(realised[layer] - rates[layer]) < bound, (layer, realised[layer], rates[layer])


def _forced_masks(model, masks):
    """Install layer dropout with hand-set keep masks (one (B,) bool tensor or None per layer)."""
    SortedLossWrapper(model, layer_dropout=0.5)
    state = layer_dropout_state(model)
    state.keep_masks = [None if m is None else torch.tensor(m) for m in masks]
    return state


def _without_layer(model, index):
    """A plain copy of `model` without decoder layer `index`: the reference for a sample that skips it."""
    reference = tiny_model("llama")
    reference.load_state_dict(model.state_dict())
    layers = get_decoder_layers(reference)
    del layers[index]
    reference.config.num_hidden_layers -= 1
    for position, layer in enumerate(layers):  # attention modules index their cache by layer
        layer.self_attn.layer_idx = position
    return reference


def test_a_dropped_layer_is_the_identity_for_that_sample_and_gets_no_gradient_from_it():
    model = tiny_model("llama").train()
    ids, mask, _ = batch(size=2)
    mask = torch.ones_like(ids)
    reference = _without_layer(model, 1).train()
    plain = tiny_model("llama").train()
    plain.load_state_dict(model.state_dict())
    _forced_masks(model, [None, [False, True], None, None])  # sample 0 skips layer 1, sample 1 keeps it

    out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(out.hidden_states[2][0], out.hidden_states[1][0])  # bit for bit the layer's input
    skipped = reference.model(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state
    kept = plain.model(input_ids=ids[1:], attention_mask=mask[1:]).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state[0], skipped[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state[1], kept[0], rtol=1e-5, atol=1e-5)

    # Only sample 0 in the loss: layer 1 gets no gradient at all, the kept layers do
    out.last_hidden_state[0].square().sum().backward()
    layers = get_decoder_layers(model)
    assert all(p.grad is None or not p.grad.any() for p in layers[1].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for i in (0, 2, 3) for p in layers[i].mlp.parameters())


def test_a_layer_skipped_by_the_whole_batch_still_runs_and_gets_zero_gradients():
    # Every parameter stays in the graph, so DDP / ZeRO-3 find a gradient (zeros) for each one
    model = tiny_model("llama").train()
    ids = batch(size=2)[0]
    _forced_masks(model, [None, None, [False, False], None])
    model.model(input_ids=ids).last_hidden_state.sum().backward()
    grads = [p.grad for p in get_decoder_layers(model)[2].parameters()]
    assert all(g is not None and not g.any() for g in grads)


def _train_plain_loop(layer_dropout_settings, steps=3):
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    wrapper = SortedLossWrapper(model, **layer_dropout_settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask, labels = batch()
    for step in range(steps):
        wrapper(input_ids=ids, attention_mask=mask, labels=labels, step=step).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_rate_zero_is_plain_training_bit_for_bit():
    plain, zero = _train_plain_loop({}), _train_plain_loop({"layer_dropout": 0.0})
    assert layer_dropout_state(zero) is None  # rate 0 installs nothing
    for (name, a), (_, b) in zip(plain.state_dict().items(), zero.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    dropped = _train_plain_loop({"layer_dropout": 0.5, "layer_dropout_scale": "constant"})
    assert any(
        not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values(), strict=True)
    )


def test_never_active_in_eval_generation_or_a_plain_forward():
    model = tiny_model("llama")
    plain = tiny_model("llama")
    plain.load_state_dict(model.state_dict())
    wrapper = SortedLossWrapper(model, layer_dropout=0.9, layer_dropout_scale="constant")
    ids, mask, labels = batch()
    wrapper.train()(input_ids=ids, attention_mask=mask, labels=labels)  # draws masks
    # A plain training-mode forward after it (no soft loss) drops nothing
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    )
    wrapper.train()(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval(), plain.eval()
    # The SoFT loss in eval mode equals the same model's without layer dropout
    reference = SortedLossWrapper(plain).eval()(input_ids=ids, attention_mask=mask, labels=labels)
    evaluated = wrapper(input_ids=ids, attention_mask=mask, labels=labels)
    assert evaluated.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    prompt = ids[1:, :5]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, plain.generate(prompt, max_new_tokens=6, do_sample=False))


def test_draws_depend_on_the_step_not_on_the_process_or_the_global_rng():
    def masks(step, rows=4, global_seed=0):
        torch.manual_seed(global_seed)
        model = tiny_model("llama")
        wrapper = SortedLossWrapper(model, layer_dropout=0.5, layer_dropout_scale="constant", seed=3).train()
        ids = batch(size=rows)[0]
        wrapper(input_ids=ids, labels=ids, step=step)
        return [m.tolist() for m in layer_dropout_state(model).keep_masks]

    assert masks(5) == masks(5, global_seed=1)  # the global RNG plays no part
    assert masks(5) != masks(6)
    assert [m[:2] for m in masks(5)] == masks(5, rows=2)  # rank 0 of 2 x 2 rows = the first rows of 1 x 4 rows


def test_checkpoint_is_a_vanilla_model(tmp_path):
    model = tiny_model("llama")
    wrapper = SortedLossWrapper(model, layer_dropout=0.3).train()
    ids, mask, labels = batch()
    wrapper(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    wrapper.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == set(tiny_model("llama").state_dict())
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert not hasattr(reloaded, "_soft_peft_layer_dropout")


def _train(output_dir, resume=None, callbacks=(), **overrides):
    dropout = dict(layer_dropout=0.5, layer_dropout_scale="linear", layer_dropout_ramp_steps=3)
    trainer = tiny_trainer(output_dir, callbacks, **(dropout | overrides))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_resumes_the_layer_dropout_curriculum_exactly(tmp_path):
    straight = _train(tmp_path / "straight")
    _train(tmp_path / "interrupted", callbacks=[StopAt(2)])
    resumed = _train(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The resumed run's history holds the checkpoint's steps 1-2 and its own 3-4: all equal the straight run's
    assert [(e["step"], e["loss"]) for e in resumed.state.log_history if "loss" in e] == [
        (e["step"], e["loss"]) for e in straight.state.log_history if "loss" in e
    ]
    # The curriculum reached the loss: a run without layer dropout trains different weights
    plain = _train(tmp_path / "plain", layer_dropout=0.0, save_strategy="no")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(plain.model.state_dict().values(), straight.model.state_dict().values(), strict=True)
    )
