"""The decoders on the CPU and on CUDA (fp32): greedy outputs token-identical to `model.generate`, early exits equal to
a no-cache reference, and speculative sampling that follows the full model's exact law."""

from __future__ import annotations

import pytest
import torch
from cuda_devices import DEVICES
from inference_helpers import LAW_PROMPT, LAW_VOCAB, chi_square_p, law_model_and_law, prompts, reference_dynamic
from tiny_models import GEN_ARCHS, NUM_LAYERS, tiny_model

from soft_peft import dynamic_generate, extract_submodel, self_speculative_generate
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.tokens import exit_confidence


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_self_speculative_greedy_matches_generate(device, arch):
    model = tiny_model(arch).to(device)
    input_ids, attention_mask = on(device, *prompts(3, 9, seed=5, pads=(4, 0, 1)))
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=13)
    for draft_exit, num_draft_tokens in [(1, 2), (2, 4), (NUM_LAYERS - 1, "adaptive")]:
        out = self_speculative_generate(
            model, input_ids, draft_exit, 13, attention_mask=attention_mask, num_draft_tokens=num_draft_tokens
        )
        assert out.sequences.device.type == device
        assert torch.equal(out.sequences, expected), (draft_exit, num_draft_tokens)
        assert out.stats.drafted > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_dynamic_matches_generate_and_the_no_cache_reference(device, arch):
    model = tiny_model(arch).to(device)
    input_ids, attention_mask = on(device, *prompts(2, 8, seed=7, pads=(2, 0)))
    exits = [1, 2, 3]
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=10)
    out = dynamic_generate(model, input_ids, exits, 1.0, max_new_tokens=10, attention_mask=attention_mask)
    assert torch.equal(out.sequences, expected) and out.stats.checks == 0

    # A threshold that exits some tokens early and not others (tiny random models are unsure)
    stack = DecoderStack(model)
    with torch.no_grad():
        states = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        values = torch.cat(
            [exit_confidence(stack.head.logits_from_raw(states[k][:, -4:]).flatten(0, 1)) for k in exits]
        )
    for quantile in (0.5, 0.25, 0.1, 0.05):
        threshold = float(values.quantile(quantile))
        reference, depths = reference_dynamic(model, input_ids, attention_mask, exits, threshold, 10)
        if len(set(depths)) > 1:
            break
    else:
        pytest.fail("no threshold mixes early and full-depth exits")
    out = dynamic_generate(
        model, input_ids, exits, threshold, max_new_tokens=10, attention_mask=attention_mask, eos_token_id=[]
    )
    assert out.stats.exits_taken.tolist() == depths
    assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_sampling_follows_the_full_model_law(device):
    """Chi-square of the 2nd and 3rd sampled tokens against the exact law (tests/inference/test_speculative.py)."""
    pytest.importorskip("scipy")
    model, exact = law_model_and_law()
    model = model.to(device)
    prompt = LAW_PROMPT.to(device)
    kwargs = dict(do_sample=True, eos_token_id=[], pad_token_id=0)
    generator = torch.Generator(device=device).manual_seed(0)
    batched = self_speculative_generate(
        model, prompt.repeat(1500, 1), 1, 3, num_draft_tokens=2, generator=generator, **kwargs
    )
    assert batched.stats.drafted > 0
    assert chi_square_p(batched.sequences.cpu(), exact, LAW_VOCAB) > 1e-3
    # The same test rejects the draft exit's own law, so it has the power to fail
    torch.manual_seed(0)
    draft = extract_submodel(model, 1).generate(prompt.repeat(1500, 1), do_sample=True, max_new_tokens=3, top_k=0)
    assert chi_square_p(draft.cpu(), exact, LAW_VOCAB) < 1e-3
