"""`extract_submodel` shares storage, equals a plain truncation, saves and reloads; SoFT checkpoints work with
transformers' own `generate(assistant_early_exit=k)`."""

import copy

import pytest
import torch
from inference_helpers import prompts
from tiny_models import GEN_ARCHS, NUM_LAYERS, tiny_model
from transformers import AutoModelForCausalLM

from soft_peft import SoFTSettings, add_sorted_exit_loss, extract_submodel
from soft_peft.inference.stack import DecoderStack
from soft_peft.model_layout import get_decoder_layers


def plain_truncation(model, num_layers):
    truncated = copy.deepcopy(model)
    layers = get_decoder_layers(truncated)
    del layers[num_layers:]
    truncated.config.num_hidden_layers = num_layers
    return truncated


@pytest.mark.parametrize("arch", GEN_ARCHS)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_shares_storage_and_equals_truncation(arch, num_layers):
    model = tiny_model(arch)
    submodel = extract_submodel(model, num_layers)
    parent = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in parent for p in submodel.parameters())
    assert submodel.config.num_hidden_layers == num_layers and model.config.num_hidden_layers == NUM_LAYERS
    input_ids, attention_mask = prompts(2, 7, pads=(2, 0))
    with torch.no_grad():
        expected = plain_truncation(model, num_layers)(input_ids, attention_mask=attention_mask).logits
        got = submodel(input_ids, attention_mask=attention_mask).logits
        # ... which is exit `num_layers` of the full model
        hidden = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        exit_logits = DecoderStack(model).head.logits_from_raw(hidden[num_layers]) if num_layers < NUM_LAYERS else None
    torch.testing.assert_close(got, expected)
    if exit_logits is not None:
        torch.testing.assert_close(got, exit_logits, rtol=1e-5, atol=1e-5)
    generated = submodel.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=6)
    reference = plain_truncation(model, num_layers).generate(
        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=6
    )
    assert torch.equal(generated, reference)


def test_copy_saves_and_reloads_standalone(tmp_path):
    model = tiny_model("llama")
    model.config.soft_exit_layers = [1, 2, 4]
    submodel = extract_submodel(model, 2, copy=True)
    parent = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in parent for p in submodel.parameters())
    submodel.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.soft_exit_layers == [1, 2]
    input_ids, _ = prompts(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, extract_submodel(model, 2)(input_ids).logits)


def test_warns_off_the_recorded_exits_and_rejects_bad_depths():
    model = tiny_model("llama")
    model.config.soft_exit_layers = [2, 4]
    with pytest.warns(UserWarning, match="not one of the exits"):
        extract_submodel(model, 3)
    for bad in (0, NUM_LAYERS + 1, 2.0):
        with pytest.raises(ValueError, match="num_layers"):
            extract_submodel(model, bad)


def test_soft_checkpoint_works_with_assistant_early_exit(tmp_path):
    """A SoFT-trained checkpoint (a few steps of the SoFT loss, saved and reloaded) runs transformers' own
    early-exit assisted generation, and it matches plain greedy decoding."""
    model = tiny_model("llama").train()
    add_sorted_exit_loss(model, SoFTSettings(exit_layers=[2, 4]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    input_ids, _ = prompts(2, 12, seed=9)
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids, soft_exit_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.soft_exit_layers == [2, 4]
    prompt = input_ids[:1, :6]
    expected = reloaded.generate(prompt, do_sample=False, max_new_tokens=10)
    assisted = reloaded.generate(prompt, do_sample=False, max_new_tokens=10, assistant_early_exit=2)
    assert torch.equal(assisted, expected)
