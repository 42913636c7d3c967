"""Both layer-wise decoders on sliding-window models (Gemma 3's mixed pattern, Mistral, Qwen2's upper layers): a
window of 4 tokens against texts of 20+, so rejected drafts and lagging positions cross the window's edge."""

import pytest
import torch
from inference_helpers import mixed_exit_threshold, prompts
from tiny_models import NUM_LAYERS, SLIDING_ARCHS, SLIDING_WINDOW, tiny_model

from soft_peft import dynamic_generate, self_speculative_generate
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.tokens import exit_confidence

PROMPT, NEW = 9, 16  # 25 positions, six windows


@pytest.fixture(scope="module", params=SLIDING_ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return tiny_model(arch)


@pytest.fixture(scope="module")
def batch():
    return prompts(3, PROMPT, seed=5, pads=(4, 0, 1))


@pytest.fixture(scope="module")
def expected(model, batch):
    input_ids, attention_mask = batch
    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=NEW)


def test_the_window_changes_the_output(arch, model, batch, expected):
    """The goldens below can fail: the same weights with a window wider than the text (what a decoder ignoring the
    window computes) generate something else."""
    assert model.config.sliding_window == SLIDING_WINDOW
    unwindowed = tiny_model(arch, sliding_window=PROMPT + NEW + 1)
    assert all(torch.equal(a, b) for a, b in zip(unwindowed.parameters(), model.parameters(), strict=True))
    input_ids, attention_mask = batch
    other = unwindowed.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=NEW)
    assert not torch.equal(other, expected)


def median_confidence(model, input_ids, attention_mask, exits) -> float:
    """The median batch-minimum confidence at ``exits`` over the prompt's last positions: a threshold some drafts
    pass and some do not (the tiny random models are unsure everywhere, about 1/40)."""
    stack = DecoderStack(model)
    with torch.no_grad():
        states = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        values = [exit_confidence(stack.head.logits_from_raw(states[k][:, -4:]).flatten(0, 1)) for k in exits]
    return float(torch.stack(values).view(len(exits), input_ids.shape[0], -1).amin(1).median())


@pytest.mark.parametrize(
    "draft_exit, num_draft_tokens, early", [(1, 2, None), (2, 4, None), (3, "adaptive", None), (3, 5, [1])]
)
def test_self_speculative_greedy_matches_generate(model, batch, expected, draft_exit, num_draft_tokens, early):
    input_ids, attention_mask = batch
    stops = {}
    if early is not None:  # drafts from exit 1 when confident, else from exit 3, stopping when neither is
        threshold = median_confidence(model, input_ids, attention_mask, [*early, draft_exit])
        stops = dict(draft_stop_threshold=threshold, early_draft_exits=early)
    out = self_speculative_generate(
        model, input_ids, draft_exit, NEW, attention_mask=attention_mask, num_draft_tokens=num_draft_tokens, **stops
    )
    assert torch.equal(out.sequences, expected)
    assert out.stats.drafted > out.stats.accepted  # some drafts were rejected and cropped


def test_single_prompt_matches_generate(model):
    input_ids, _ = prompts(1, 7, seed=3)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=20)
    out = self_speculative_generate(model, input_ids, 2, 20, num_draft_tokens=3)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("kv_fill", ["recompute", "propagate"])
def test_dynamic_threshold_one_matches_generate(model, batch, expected, kv_fill):
    input_ids, attention_mask = batch
    out = dynamic_generate(model, input_ids, [1, 2, 3], 1.0, NEW, attention_mask=attention_mask, kv_fill=kv_fill)
    assert torch.equal(out.sequences, expected)
    assert out.stats.average_depth == NUM_LAYERS


def test_dynamic_early_exits_match_a_no_cache_reference(model):
    """Positions left at an early exit get their upper sliding layers later (recompute): still exact."""
    input_ids, attention_mask = prompts(2, PROMPT, seed=7, pads=(2, 0))
    threshold, reference, depths = mixed_exit_threshold(model, input_ids, attention_mask, [1, 2, 3], NEW)
    out = dynamic_generate(model, input_ids, [1, 2, 3], threshold, NEW, attention_mask=attention_mask, eos_token_id=[])
    assert out.stats.exits_taken.tolist() == depths
    assert torch.equal(out.sequences, reference)


def test_unsupported_attention_types_are_refused_by_name():
    model = tiny_model("llama")
    model.config.layer_types = ["full_attention", "chunked_attention"] * 2  # Llama 4's pattern
    model.config.attention_chunk_size = 2
    with pytest.raises(ValueError, match=r"chunked_attention at layers \[2, 4\]"):
        self_speculative_generate(model, prompts(1, 4)[0], 1, 4)
    gemma = tiny_model("gemma3", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="bidirectional"):
        dynamic_generate(gemma, prompts(1, 4)[0], [1], 0.5, 4)


def test_gemma2_alternating_window_matches_generate():
    """Gemma 2 alternates sliding and full layers, with attention softcapping inside them: exact too."""
    model = tiny_model("gemma2", sliding_window=SLIDING_WINDOW)
    assert {"sliding_attention", "full_attention"} <= set(model.config.layer_types)
    input_ids, attention_mask = prompts(2, PROMPT, seed=2, pads=(3, 0))
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=NEW)
    out = self_speculative_generate(model, input_ids, 2, NEW, attention_mask=attention_mask, num_draft_tokens=3)
    assert torch.equal(out.sequences, expected)
    out = dynamic_generate(model, input_ids, [1, 2, 3], 1.0, NEW, attention_mask=attention_mask)
    assert torch.equal(out.sequences, expected)
