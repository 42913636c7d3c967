"""`soft_peft.exit_head`: one backbone lookup and one raw -> normed -> logits contract for training, evaluation and
decoding, and the deprecated names of the redesign."""

import importlib
import subprocess
import sys

import pytest
import torch
from tiny_models import ARCHS, NUM_LAYERS, VOCAB, tiny_model

import soft_peft.exit_forward
import soft_peft.wrapper
from soft_peft import SortedLossWrapper
from soft_peft.evaluation.per_exit import _normed_exit_states
from soft_peft.exit_head import ExitHead, backbone_outputs, find_backbone, find_exit_head
from soft_peft.inference import DecoderStack, SubsetHead, dynamic_generate
from soft_peft.loss import ExitLossTerms

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


def test_find_backbone_unwraps_peft_and_is_the_prefix_module():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    assert find_backbone(model) is model.model
    adapted = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert find_backbone(adapted) is adapted.get_base_model().model
    gpt2 = tiny_model("gpt2")
    assert find_backbone(gpt2) is gpt2.transformer


def test_backbone_outputs_rejects_missing_hidden_states(monkeypatch):
    model = tiny_model("llama")
    backbone = model.model
    real_forward = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda *a, **k: real_forward(*a, **{**k, "output_hidden_states": False}))
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        backbone_outputs(model, input_ids=torch.tensor([[5, 6, 7]]))


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


def test_deprecated_names_warn_and_resolve():
    model = tiny_model("llama")
    head = find_exit_head(model)
    stack = DecoderStack(model)
    raw = torch.randn(2, 3, model.config.hidden_size)
    ids = torch.tensor([3, 10, 50])
    with torch.no_grad():
        with pytest.warns(FutureWarning, match="normed_from_raw"):
            torch.testing.assert_close(head.normalize(raw, 1), head.normed_from_raw(raw))
        with pytest.warns(FutureWarning, match="normed_from_raw"):
            assert torch.equal(head.normalize(raw, NUM_LAYERS), raw)  # the last exit was given `last_hidden_state`
        with pytest.warns(FutureWarning, match="logits_from_normed"):
            torch.testing.assert_close(head.logits(raw), head.logits_from_normed(raw))
        with pytest.warns(FutureWarning, match="head.normed_from_raw"):
            torch.testing.assert_close(stack.normalize(raw), head.normed_from_raw(raw))
        with pytest.warns(FutureWarning, match="head.logits_from_raw"):
            torch.testing.assert_close(stack.logits(raw), head.logits_from_raw(raw))
        with pytest.warns(FutureWarning, match="SubsetHead"):
            old = SubsetHead(stack, ids)
        with pytest.warns(FutureWarning, match="logits_from_raw"):
            torch.testing.assert_close(old.logits(raw), SubsetHead(head, ids).logits_from_raw(raw))
    out = dynamic_generate(model, torch.tensor([[5, 6, 7]]), [1], 1e-6, max_new_tokens=3)
    with pytest.warns(FutureWarning, match="exits_taken"):
        assert torch.equal(out.exit_layers, out.exits_taken)
    with pytest.warns(FutureWarning, match="ExitLossTerms"):
        from soft_peft.loss import SortedExitLoss
    assert SortedExitLoss is ExitLossTerms
    sys.modules.pop("soft_peft.modeling", None)
    with pytest.warns(FutureWarning, match="soft_peft.wrapper"):
        modeling = importlib.import_module("soft_peft.modeling")
    assert modeling.SortedLossWrapper is soft_peft.wrapper.SortedLossWrapper
    assert modeling.add_sorted_exit_loss is soft_peft.wrapper.add_sorted_exit_loss
    from soft_peft.exits import ExitHead as OldExitHead
    from soft_peft.exits import find_exit_head as old_find_exit_head

    assert OldExitHead is ExitHead and old_find_exit_head is find_exit_head


def test_the_package_uses_no_deprecated_name_at_import():
    code = (
        "import sys, soft_peft, soft_peft.exits, soft_peft.inference, soft_peft.evaluation; "
        "print('soft_peft.modeling' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
