"""`soft_peft.exit_head`: one raw -> normed -> logits contract for training, evaluation and decoding, found
generically, with each model's logit post-processing."""

import pytest
import torch
from tiny_models import ARCHS, MOE_ARCHS, NUM_LAYERS, VOCAB, tiny_model

import soft_peft.exit_forward
import soft_peft.wrapper
from soft_peft import SortedLossWrapper
from soft_peft.evaluation.per_exit import _normed_exit_states
from soft_peft.exit_head import find_exit_head
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.vocab import SubsetHead
from soft_peft.model_layout import backbone_outputs, get_decoder_layers

EXITS = [1, 2, NUM_LAYERS]


def reference_normed_states(model, ids, exits):
    """Plain reference: ``hidden_states[k]`` through the final norm module by hand; the last exit is the model's own
    ``last_hidden_state``. ``(E, B, T, H)``."""
    out = model.model(input_ids=ids, output_hidden_states=True) if hasattr(model, "model") else None
    if out is None:  # GPT-2 keeps its backbone under `transformer`, its final norm as `ln_f`
        out = model.transformer(input_ids=ids, output_hidden_states=True)
        norm = model.transformer.ln_f
    else:
        norm = model.model.norm
    return torch.stack([out.last_hidden_state if k == NUM_LAYERS else norm(out.hidden_states[k]) for k in exits])


def wrapper_normed_states(model, ids, exits, monkeypatch):
    """The normed states the loss wrapper hands to `sorted_exit_loss`, every position labelled. ``(E, B, T-1, H)``."""
    seen = []

    def recording_loss(exit_hidden, *args, **kwargs):
        seen.extend(h.detach() for h in exit_hidden)
        return real_loss(exit_hidden, *args, **kwargs)

    real_loss = soft_peft.exit_forward.sorted_exit_loss
    monkeypatch.setattr(soft_peft.exit_forward, "sorted_exit_loss", recording_loss)
    SortedLossWrapper(model, exit_layers=exits)(input_ids=ids, labels=ids)
    batch, length = ids.shape
    return torch.stack(seen).view(len(exits), batch, length - 1, -1)


def decoder_normed_states(model, ids, exits):
    """The layer-wise decoders' states: layers run range by range over one cache, then `normed_from_raw`."""
    stack = DecoderStack(model)
    inputs = stack.step_inputs(None, 0, ids.shape[1], ids.shape[0])
    cache = stack.new_cache()
    hidden, done, states = stack.embed(ids, inputs), 0, []
    for k in exits:
        hidden = stack.run_layers(hidden, done + 1, k, inputs, cache)
        done = k
        states.append(stack.head.normed_from_raw(hidden))
    return torch.stack(states)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_wrapper_evaluation_and_decoders_see_the_same_exit_states(arch, monkeypatch):
    model = tiny_model(arch)
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_normed_states(model, ids, EXITS)[:, :, :-1]  # (E, B, T-1, H)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids) > 0}
        evaluation = _normed_exit_states(model, batch, EXITS).view_as(expected)
        decoders = decoder_normed_states(model, ids, EXITS)[:, :, :-1]
    training = wrapper_normed_states(model, ids, EXITS, monkeypatch)
    for states in (training, evaluation, decoders):
        torch.testing.assert_close(states, expected)
    # The exits really differ, so agreeing is not trivial
    assert not torch.allclose(expected[0], expected[-1], atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_last_exit_logits_are_the_models_logits_and_raw_contract_holds(arch):
    model = tiny_model(arch)
    ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    head = find_exit_head(model)
    with torch.no_grad():
        outputs = backbone_outputs(model, input_ids=ids)
        torch.testing.assert_close(head.logits_from_normed(head.exit_state(outputs, NUM_LAYERS)), model(ids).logits)
        raw = outputs.hidden_states[2]
        torch.testing.assert_close(head.exit_state(outputs, 2), head.normed_from_raw(raw))
        torch.testing.assert_close(head.logits_from_raw(raw), head.logits_from_normed(head.normed_from_raw(raw)))


def test_subset_head_takes_the_exit_head():
    model = tiny_model("llama")
    head = find_exit_head(model)
    ids = torch.tensor([3, 10, 50])
    hidden = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            SubsetHead(head, ids).logits_from_raw(hidden), head.logits_from_raw(hidden)[..., ids]
        )
    with pytest.raises(ValueError, match="find_exit_head"):
        SubsetHead(model, ids)


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_last_exit_is_the_models_own_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(4, VOCAB, (2, 7))
    head = find_exit_head(model)
    assert head.num_layers == NUM_LAYERS == len(get_decoder_layers(model))
    backbone = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        outputs = backbone(input_ids=ids, output_hidden_states=True)
        exit_logits = head.logits_from_normed(head.exit_state(outputs, NUM_LAYERS))
        torch.testing.assert_close(exit_logits, model(input_ids=ids).logits)
        # hidden_states[-1] is already normed: exit_state() must not norm the last exit again
        torch.testing.assert_close(outputs.hidden_states[-1], outputs.last_hidden_state)


def test_logit_post_processing_is_read_from_the_config():
    assert find_exit_head(tiny_model("gemma2")).final_logit_softcapping == 2.0
    assert find_exit_head(tiny_model("cohere")).logit_scale == 0.5
    assert find_exit_head(tiny_model("granite")).logit_scale == 0.25


def test_missing_norm_names_the_class_and_the_fix():
    model = tiny_model("llama")
    del model.model.norm
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*final_norm="):
        find_exit_head(model)
    head = find_exit_head(model, final_norm=torch.nn.Identity())
    assert isinstance(head.final_norm, torch.nn.Identity)
