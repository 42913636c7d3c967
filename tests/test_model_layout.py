"""`soft_peft.model_layout`: the backbone, decoder layers and final norm of a causal LM, found by structure through
PEFT and sharding wrappers."""

import pytest
import torch
from tiny_models import ARCHS, MOE_ARCHS, VOCAB, tiny_model

from soft_peft.exit_head import find_exit_head
from soft_peft.model_layout import backbone_outputs, find_backbone, find_final_norm, get_decoder_layers


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
