"""`dynamic_generate` against `model.generate` (thresholds 1.0) and a no-cache per-token early-exit reference."""

import pytest
import torch
from inference_helpers import mixed_exit_threshold, prompts, reference_dynamic
from tiny_models import GEN_ARCHS, NUM_LAYERS, tiny_model

from soft_peft import dynamic_generate, recorded_exit_layers
from soft_peft.inference.dynamic import default_dynamic_exits
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.tokens import exit_confidence


@pytest.fixture(scope="module", params=GEN_ARCHS)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("kv_fill", ["recompute", "propagate"])
def test_threshold_one_equals_greedy_generate(model, kv_fill):
    input_ids, attention_mask = prompts(3, 8, seed=1, pads=(3, 0, 1))
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=12)
    out = dynamic_generate(
        model, input_ids, [1, 2, 3], 1.0, max_new_tokens=12, attention_mask=attention_mask, kv_fill=kv_fill
    )
    assert torch.equal(out.sequences, expected)
    assert out.stats.average_depth == NUM_LAYERS and out.stats.checks == 0


@pytest.mark.parametrize("batch, pads", [(1, ()), (2, (2, 0))])
def test_recompute_matches_no_cache_reference(model, batch, pads):
    """EE-LLM-style recomputation leaves the cache exact, so early exits match a from-scratch reference."""
    input_ids, attention_mask = prompts(batch, 8, seed=7, pads=pads)
    exits = [1, 2, 3]
    threshold, expected, depths = mixed_exit_threshold(model, input_ids, attention_mask, exits, 10)
    out = dynamic_generate(
        model, input_ids, exits, threshold, max_new_tokens=10, attention_mask=attention_mask, eos_token_id=[]
    )
    assert out.stats.exits_taken.tolist() == depths
    assert torch.equal(out.sequences, expected)
    assert out.stats.average_depth == pytest.approx(sum(depths) / len(depths))


def test_propagate_fills_every_layer_and_saves_depth():
    model = tiny_model("llama")
    input_ids, _ = prompts(1, 8, seed=7)
    threshold = mixed_exit_threshold(model, input_ids, None, [1, 2], 14)[0]
    out = dynamic_generate(model, input_ids, [1, 2], threshold, max_new_tokens=14, kv_fill="propagate")
    assert out.sequences.shape == (1, 22)
    assert out.stats.average_depth < NUM_LAYERS
    # Each skipped layer still got its keys and values (counted as a layer pass per filled position)
    assert out.stats.layer_forwards[-1] == out.stats.layer_forwards[0]


def test_margin_confidence_and_per_exit_thresholds():
    """Each exit is judged by the top-1/top-2 margin against its own threshold, as a from-scratch reference does."""
    model = tiny_model("llama")
    input_ids, _ = prompts(1, 6, seed=3)
    stack = DecoderStack(model)
    with torch.no_grad():
        greedy = model.generate(input_ids, do_sample=False, max_new_tokens=12)
        states = model(greedy, output_hidden_states=True).hidden_states
        margins = [
            exit_confidence(stack.head.logits_from_raw(states[k][0, input_ids.shape[1] :]), "margin") for k in (1, 3)
        ]
    # Per-exit thresholds at quantiles of each exit's margins, until the reference's later tokens take all three depths
    for low, high in ((0.7, 0.5), (0.9, 0.5), (0.3, 0.5)):
        thresholds = [float(margins[0].quantile(low)), float(margins[1].quantile(high))]
        expected, depths = reference_dynamic(model, input_ids, None, [1, 3], thresholds, 12, confidence="margin")
        if set(depths[1:]) == {1, 3, NUM_LAYERS}:
            break
    else:
        raise AssertionError("no per-exit thresholds make the reference exit at 1, 3 and the last layer")
    out = dynamic_generate(model, input_ids, [1, 3], thresholds, max_new_tokens=12, confidence="margin")
    assert out.stats.exits_taken.tolist() == depths
    assert torch.equal(out.sequences, expected)
    # The same thresholds on max-probability confidence decide otherwise, so the margin was really used
    max_prob = reference_dynamic(model, input_ids, None, [1, 3], thresholds, 12)[1]
    assert max_prob != depths
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    probs = logits.softmax(-1)[0]
    assert exit_confidence(logits, "margin").item() == pytest.approx((probs[0] - probs[1]).item())
    assert exit_confidence(logits).item() == pytest.approx(probs[0].item())


def test_default_exits_use_recorded_layers():
    model = tiny_model("llama", num_hidden_layers=30)
    model.config.soft_exit_layers = [9, 12, 15, 18, 21, 24, 27, 30]
    assert default_dynamic_exits(30, recorded_exit_layers(model)) == [15, 21, 27]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(thresholds=0.0), "Thresholds"),
        (dict(thresholds=1.5), "Thresholds"),
        (dict(thresholds=[0.9]), "thresholds"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(confidence="entropy"), "confidence"),
        (dict(kv_fill="copy"), "kv_fill"),
        (dict(exits=[0]), r"exits has \[0\], but layers are counted from 1"),
        (dict(exits="12"), r"exits has \[12\] outside 1\.\.4\. .*e\.g\. exits=\["),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model = tiny_model("llama")
    input_ids, _ = prompts(1, 4)
    arguments = dict(exits=[1, 2], thresholds=0.9, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        dynamic_generate(model, input_ids, **arguments)


def test_padding_without_attention_mask_raises():
    input_ids, _ = prompts(2, 6, pads=(1, 0))
    with pytest.raises(ValueError, match="attention_mask"):
        dynamic_generate(tiny_model("gpt2"), input_ids, [1], 0.5, max_new_tokens=3)
