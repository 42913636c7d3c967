"""`SortedLossWrapper` on tiny models of every supported architecture, against a plain per-exit reference."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, MOE_ARCHS, NUM_LAYERS, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from soft_peft import SoFTSettings, SortedLossWrapper, add_sorted_exit_loss
from soft_peft.exit_head import find_exit_head
from soft_peft.model_layout import get_decoder_layers


def batch(seed=0, size=3, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in row 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4] = -100  # the first real token would be predicted from a pad position
    labels[1, :5] = -100  # a prompt that is not trained
    return ids, mask, labels


def reference_exit_losses(model, ids, mask, labels, exits):
    """Plain reference: full logits at every exit (norm + head + post-processing) and F.cross_entropy."""
    head = find_exit_head(model)
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    losses = {}
    for k in exits:
        hidden = out.last_hidden_state if k == NUM_LAYERS else out.hidden_states[k]
        logits = head.logits_from_normed(hidden if k == NUM_LAYERS else head.normed_from_raw(hidden))  # (B, T, V)
        losses[k] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    return losses


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_loss_and_gradients_match_reference(arch):
    exits = [1, 3, NUM_LAYERS]
    model = tiny_model(arch)  # eval mode: no dropout, so two forwards are comparable
    ids, mask, labels = batch()
    wrapper = SortedLossWrapper(model, exit_layers=exits)
    out = wrapper(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref = reference_exit_losses(model, ids, mask, labels, exits)
    # The default weights ("last:0.75"): the last exit keeps 3/4 of the loss, the two early exits share 1/4
    ref_loss = 0.75 * ref[NUM_LAYERS] + 0.125 * (ref[1] + ref[3])
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k in exits:
        torch.testing.assert_close(out.exit_losses[k], ref[k], rtol=1e-5, atol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_last_exit_alone_equals_the_models_own_loss(arch):
    model = tiny_model(arch)
    ids, mask, labels = batch(seed=1)
    out = SortedLossWrapper(model, exit_layers=[NUM_LAYERS])(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_last_exit_with_router_loss_equals_the_models_own_loss(arch):
    model = tiny_model(arch)
    ids, mask, labels = batch(seed=1)
    wrapper = SortedLossWrapper(model, exit_layers=[NUM_LAYERS])
    out = wrapper(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    own = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, own.aux_loss)
    torch.testing.assert_close(out.loss, own.loss)
    assert out.aux_loss > 0 and model.config.router_aux_loss_coef > 0  # the aux loss is really in both
    # Added once, not per exit
    two = SortedLossWrapper(model, exit_layers=[2, NUM_LAYERS])
    out = two(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    torch.testing.assert_close(out.loss, out.loss_without_aux + model.config.router_aux_loss_coef * own.aux_loss)
    # Without router logits (the config's default), no aux loss
    assert wrapper(input_ids=ids, attention_mask=mask, labels=labels).aux_loss is None


def test_gradient_accumulation_is_exact():
    model = tiny_model("llama")
    wrapper = SortedLossWrapper(model, exit_layers=[2, 4], exit_loss_weights="linear")
    ids, mask, labels = batch(seed=2, size=4)
    wrapper(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = int((labels[:, 1:] != -100).sum())  # what Trainer passes as num_items_in_batch
    for rows in (slice(0, 2), slice(2, 4)):
        out = wrapper(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], num_items_in_batch=total)
        out.loss.backward()
    for expected, p in zip(full, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)


def test_all_masked_batch_is_finite_zero():
    model = tiny_model("llama")
    ids, mask, _ = batch()
    out = SortedLossWrapper(model)(input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_without_labels_the_model_is_unchanged():
    model = tiny_model("qwen2")
    ids, mask, _ = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(SortedLossWrapper(model)(input_ids=ids, attention_mask=mask).logits, expected)


def test_save_is_vanilla_and_reloads_with_identical_exit_losses(tmp_path):
    model = tiny_model("llama")
    wrapper = SortedLossWrapper(model, exit_layers="2:5:2")
    ids, mask, labels = batch()
    before = wrapper(input_ids=ids, attention_mask=mask, labels=labels).exit_losses
    wrapper.save_pretrained(tmp_path)
    assert all(not key.startswith("model.model.model") for key in wrapper.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.soft_exit_layers == [2, 4]
    assert set(reloaded.state_dict()) == set(model.state_dict())
    after = SortedLossWrapper(reloaded, exit_layers=reloaded.config.soft_exit_layers)(
        input_ids=ids, attention_mask=mask, labels=labels
    ).exit_losses
    for k in (2, 4):
        torch.testing.assert_close(after[k], before[k])


def test_rewrapping_updates_settings_instead_of_stacking():
    model = tiny_model("llama")
    SortedLossWrapper(model, exit_layers=[1, 4])
    wrapper = SortedLossWrapper(model, exit_layers=[2, 4])
    ids, mask, labels = batch()
    assert set(wrapper(input_ids=ids, attention_mask=mask, labels=labels).exit_losses) == {2, 4}


def test_bad_exit_layers_raise_with_depth():
    with pytest.raises(ValueError, match="4 decoder layers"):
        SortedLossWrapper(tiny_model("llama"), exit_layers=[2, 5])


def controls_reference(model, ids, mask, labels, exits, weights, head_grad, distill, temperature):
    """Full logits per exit; with head_grad="last" the early exits see a detached norm, projection and head."""
    head = find_exit_head(model)
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100

    def early_logits(hidden):
        if head_grad == "all":
            return head.logits_from_raw(hidden)
        for module in (head.final_norm, head.output_projection):
            if module is not None:
                detached = {name: p.detach() for name, p in module.named_parameters()}
                hidden = torch.func.functional_call(module, detached, (hidden,))
        bias = head.lm_head.bias
        return head.post_process(
            F.linear(hidden, head.lm_head.weight.detach(), None if bias is None else bias.detach())
        )

    def flat(logits):
        return logits[:, :-1].reshape(-1, logits.size(-1))[keep]  # (N, V)

    last = flat(head.logits_from_normed(out.last_hidden_state))
    teacher = F.log_softmax(last.detach() / temperature, -1)
    total = weights[-1] * F.cross_entropy(last, targets[keep])
    agreement = {}
    for k, w in zip(exits[:-1], weights[:-1], strict=True):
        z = flat(early_logits(out.hidden_states[k]))
        kl = F.kl_div(F.log_softmax(z / temperature, -1), teacher, log_target=True, reduction="batchmean")
        total = total + w * ((1 - distill) * F.cross_entropy(z, targets[keep]) + distill * temperature**2 * kl)
        agreement[k] = (z.argmax(-1) == last.argmax(-1)).float().mean()
    return total, agreement


@pytest.mark.parametrize("arch", ARCHS)
def test_quality_controls_match_reference(arch):
    exits = [1, 3, NUM_LAYERS]
    settings = dict(exit_head_grad="last", exit_distill_weight=0.4, exit_distill_temperature=2.0)
    model = tiny_model(arch)
    ids, mask, labels = batch()
    out = SortedLossWrapper(model, exit_layers=exits, exit_loss_weights="last:0.6", **settings)(
        input_ids=ids, attention_mask=mask, labels=labels
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref, agreement = controls_reference(model, ids, mask, labels, exits, [0.2, 0.2, 0.6], "last", 0.4, 2.0)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert all(p.requires_grad for p in model.parameters())
    assert out.exit_agreement.keys() == agreement.keys()
    for k, expected in agreement.items():
        torch.testing.assert_close(out.exit_agreement[k], expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied head
def test_last_head_grad_trains_the_norm_and_head_from_the_last_exit_only(arch):
    model = tiny_model(arch)
    ids, mask, labels = batch(seed=3)
    head = find_exit_head(model)
    shared = [head.lm_head.weight, *head.final_norm.parameters()]
    out = SortedLossWrapper(model, exit_layers=[2, NUM_LAYERS], exit_loss_weights="last:0.5", exit_head_grad="last")(
        input_ids=ids, attention_mask=mask, labels=labels
    )
    got = torch.autograd.grad(out.loss, shared)
    # Reference: the last exit alone for the norm and head, plus the early exit's gradient through the input
    # embedding (tied head) that reaches it from below, which a full-reference run of both exits gives
    ref, _ = controls_reference(model, ids, mask, labels, [2, NUM_LAYERS], [0.5, 0.5], "last", 0.0, 1.0)
    for g, expected in zip(got, torch.autograd.grad(ref, shared), strict=True):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    if arch == "llama":  # untied: the head and norm see only the last exit's loss
        logits = model(input_ids=ids, attention_mask=mask).logits
        last_only = 0.5 * F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        for g, expected in zip(got, torch.autograd.grad(last_only, shared), strict=True):
            torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    # and the early exit still trains the layers below it, exactly as with exit_head_grad="all"
    layer = get_decoder_layers(model)[0]
    layer_params = list(layer.parameters())
    with_last = torch.autograd.grad(
        SortedLossWrapper(model, exit_layers=[2, NUM_LAYERS], exit_loss_weights="last:0.5", exit_head_grad="last")(
            input_ids=ids, attention_mask=mask, labels=labels
        ).loss,
        layer_params,
    )
    with_all = torch.autograd.grad(
        SortedLossWrapper(model, exit_layers=[2, NUM_LAYERS], exit_loss_weights="last:0.5")(
            input_ids=ids, attention_mask=mask, labels=labels
        ).loss,
        layer_params,
    )
    for a, b in zip(with_last, with_all, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_every_control_reduces_to_plain_sft_with_the_last_exit_alone(arch):
    model = tiny_model(arch)
    ids, mask, labels = batch(seed=4)
    wrapper = SortedLossWrapper(
        model,
        exit_layers=[NUM_LAYERS],
        exit_loss_weights="last:0.3",
        exit_head_grad="last",
        exit_distill_weight=0.5,
        exit_distill_temperature=2.0,
    )
    out = wrapper(input_ids=ids, attention_mask=mask, labels=labels)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.loss, ref)
    for g, expected in zip(got, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


def test_bad_controls_raise_before_any_forward():
    with pytest.raises(ValueError, match="exit_head_grad"):
        SortedLossWrapper(tiny_model("llama"), exit_head_grad="none")
    with pytest.raises(ValueError, match="exit_distill_weight"):
        SortedLossWrapper(tiny_model("llama"), exit_distill_weight=-0.1)
    with pytest.raises(ValueError, match="exit_loss_kernel must be one of"):
        SortedLossWrapper(tiny_model("llama"), exit_loss_kernel="triton")
    with pytest.raises(ValueError, match="exit_vocab_chunk_size must be a positive integer"):
        SortedLossWrapper(tiny_model("llama"), exit_vocab_chunk_size=0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        SortedLossWrapper(tiny_model("llama"), loss_type="focal")


def test_overrides_replace_the_given_settings_and_unknown_names_are_refused():
    model = tiny_model("llama")
    base = SoFTSettings(exit_layers=[1, 4], exit_loss_weights="uniform")
    wrapper = SortedLossWrapper(model, base, exit_layers=[2, 4])
    assert wrapper.exit_layers == [2, 4] and wrapper.settings.exit_loss_weights == "uniform"
    assert base.exit_layers == [1, 4]  # the caller's settings are not changed
    with pytest.raises(TypeError, match=r"\['vocab_chunk_size'\] is not a SoFT setting; .*exit_vocab_chunk_size"):
        SortedLossWrapper(model, vocab_chunk_size=0)
    with pytest.raises(TypeError, match="settings must be a SoFTSettings .* exit_layers=\\[2, 4\\]"):
        SortedLossWrapper(model, [2, 4])
    # add_sorted_exit_loss takes the same object
    assert add_sorted_exit_loss(model, SoFTSettings(exit_layers="1,3")) == [1, 3]
    assert model.config.soft_exit_layers == [1, 3]


def test_a_rejected_rewrap_keeps_the_previous_settings():
    model = tiny_model("llama")
    wrapper = SortedLossWrapper(model, exit_layers=[2, 4])
    with pytest.raises(ValueError, match="exit_distill_weight"):
        SortedLossWrapper(model, exit_layers=[1, 4], exit_distill_weight=2.0)
    ids, mask, labels = batch()
    assert set(wrapper(input_ids=ids, attention_mask=mask, labels=labels).exit_losses) == {2, 4}
    assert model.config.soft_exit_layers == [2, 4]
