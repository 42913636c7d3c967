import re

import pytest
import torch
from tiny_models import ARCHS, MOE_ARCHS, NUM_LAYERS, VOCAB, tiny_model

from soft_peft.exits import (
    default_exit_layers,
    find_exit_head,
    find_final_norm,
    get_decoder_layers,
    parse_exit_layers,
    parse_exit_spec,
    record_exit_layers,
    recorded_exit_layers,
)


def test_default_exits_match_the_paper_for_40_layers():
    assert default_exit_layers(40) == [12, 16, 20, 24, 28, 32, 36, 40]


@pytest.mark.parametrize(
    "num_layers, expected",
    [(30, [9, 12, 15, 18, 21, 24, 27, 30]), (32, [10, 13, 16, 19, 22, 26, 29, 32]), (4, [1, 2, 3, 4]), (1, [1])],
)
def test_default_exits_scale_with_depth(num_layers, expected):
    assert default_exit_layers(num_layers) == expected


@pytest.mark.parametrize(
    "spec, expected",
    [
        ([3, 1], [1, 3]),
        ("12:41:4", [12, 16, 20, 24, 28, 32, 36, 40]),
        ("30:", [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]),
        ("4,8, 40", [4, 8, 40]),
        (None, [12, 16, 20, 24, 28, 32, 36, 40]),
    ],
)
def test_parse_exit_layers(spec, expected):
    assert parse_exit_layers(spec, 40) == expected


@pytest.mark.parametrize("spec", [[0, 4], [41], [4, 4], [2.0, 4], "a,b", "1:10:0", "50:60", [True]])
def test_invalid_exit_layers_name_depth_and_example(spec):
    with pytest.raises(ValueError, match=r"40 decoder layers.*e\.g\. exit_layers=\[12,16"):
        parse_exit_layers(spec, 40)


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


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_final_norm_maps_the_last_layers_output_to_last_hidden_state(arch):
    """Checked from outside: the last decoder layer's raw output, through the norm found, is `last_hidden_state`."""
    model = tiny_model(arch)
    norm = find_final_norm(model)
    captured = []
    hook = get_decoder_layers(model)[-1].register_forward_hook(
        lambda module, inputs, output: captured.append(output[0] if isinstance(output, tuple) else output)
    )
    with torch.no_grad():
        last = getattr(model, model.base_model_prefix)(input_ids=torch.randint(4, VOCAB, (2, 5))).last_hidden_state
        hook.remove()
        torch.testing.assert_close(norm(captured[-1]), last, rtol=0, atol=0)
        assert not torch.equal(captured[-1], last)  # the norm is not a no-op, so the check can fail


def test_final_norm_is_found_by_structure_not_by_name():
    lfm2 = tiny_model("lfm2")
    assert find_exit_head(lfm2).final_norm is lfm2.model.embedding_norm  # LFM2's final norm has no usual name
    bloom = tiny_model("bloom")  # two norms outside the layers: the forward check picks the final one
    assert find_final_norm(bloom) is bloom.transformer.ln_f
    llama = tiny_model("llama")
    llama.model.unused_norm = type(llama.model.norm)(32)  # a second, unused norm layer
    assert find_final_norm(llama) is llama.model.norm


def test_final_norm_is_cached_on_the_instance():
    model = tiny_model("bloom")
    calls = []
    model.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert find_final_norm(model) is model.transformer.ln_f and len(calls) == 1
    assert find_final_norm(model) is model.transformer.ln_f and len(calls) == 1  # no second check forward
    assert model._soft_peft_final_norm == "ln_f"


def test_sharded_parameters_need_no_forward_unless_ambiguous():
    llama, bloom = tiny_model("llama"), tiny_model("bloom")
    for model in (llama, bloom):
        for parameter in model.parameters():
            parameter.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    assert find_final_norm(llama) is llama.model.norm  # one norm layer outside the layers: unambiguous
    with pytest.raises(ValueError, match=r"word_embeddings_layernorm.*sharded.*final_norm="):
        find_final_norm(bloom)
    assert find_exit_head(bloom, final_norm=bloom.transformer.ln_f).final_norm is bloom.transformer.ln_f


def test_exit_layers_are_recorded_in_the_config(tmp_path):
    model = tiny_model("llama")
    assert recorded_exit_layers(model) is None
    record_exit_layers(model, [2, 4])
    model.save_pretrained(tmp_path)
    assert '"soft_exit_layers": [\n    2,\n    4\n  ]' in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, None),
        ([3, 1], [1, 3]),
        ("4,8, 40", [4, 8, 40]),
        ("12:41:4", list(range(12, 41, 4))),
        ("9::3", slice(9, None, 3)),
    ],
)
def test_parse_exit_spec_needs_no_depth(spec, expected):
    assert parse_exit_spec(spec) == expected


@pytest.mark.parametrize("spec", [[0, 4], "0", [4, 4], [2.0, 4], "a,b", "1:10:0", "0:5", "5:3", [True], "1:2:3:4"])
def test_invalid_exit_spec_names_no_depth(spec):
    with pytest.raises(ValueError, match=r"from 1 to the model's depth, e\.g\. exit_layers='9,12,15'") as error:
        parse_exit_spec(spec)
    assert "decoder layers" not in str(error.value)  # no made-up depth


def test_open_slice_ends_at_the_depth():
    assert parse_exit_layers("9::3", 30) == [9, 12, 15, 18, 21, 24, 27, 30]
    with pytest.raises(ValueError, match="selects no layer. The model has 4 decoder layers"):
        parse_exit_layers("9::3", 4)


@pytest.mark.parametrize("num_layers", [30, 40, 32])
def test_an_out_of_range_exit_suggests_a_slice_that_parses(num_layers):
    with pytest.raises(ValueError, match="outside") as raised:
        parse_exit_layers([num_layers + 1], num_layers)
    suggested, meaning = re.search(r"slice string '([\d:]+)' \(([^)]+)\)", str(raised.value)).groups()
    layers = parse_exit_layers(suggested, num_layers)
    if meaning == "the same exits":
        assert layers == default_exit_layers(num_layers)
    else:  # 32 layers: the default is not evenly spaced
        assert layers == list(range(default_exit_layers(num_layers)[0], num_layers + 1))
