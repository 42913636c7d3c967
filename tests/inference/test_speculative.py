"""`self_speculative_generate` vs `model.generate` (greedy: token identity) and the exact law (sampling)."""

import pytest
import torch
from inference_helpers import LAW_PROMPT, LAW_VOCAB, chi_square_p, law_model_and_law, prompts
from tiny_models import GEN_ARCHS, NUM_LAYERS, tiny_model

from soft_peft import extract_submodel, self_speculative_generate
from soft_peft.inference.drafter import choose_draft_length
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.tokens import exit_confidence, sampling_probs


@pytest.fixture(scope="module", params=GEN_ARCHS)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("num_draft_tokens", [1, 3, "adaptive"])
@pytest.mark.parametrize("draft_exit", [1, 2, NUM_LAYERS - 1])
def test_greedy_matches_generate_single(model, draft_exit, num_draft_tokens):
    input_ids, _ = prompts(1, 7, seed=draft_exit)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=17)
    out = self_speculative_generate(model, input_ids, draft_exit, 17, num_draft_tokens=num_draft_tokens)
    assert torch.equal(out.sequences, expected)
    assert out.stats.new_tokens == 17 and out.stats.cycles > 0
    assert out.stats.accepted <= out.stats.drafted


@pytest.mark.parametrize("draft_exit, num_draft_tokens", [(1, 2), (2, 4), (3, "adaptive")])
def test_greedy_matches_generate_batched_left_padding(model, draft_exit, num_draft_tokens):
    input_ids, attention_mask = prompts(3, 9, seed=5, pads=(4, 0, 1))
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=13)
    out = self_speculative_generate(
        model, input_ids, draft_exit, 13, attention_mask=attention_mask, num_draft_tokens=num_draft_tokens
    )
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_short_generations_match(model, max_new_tokens):
    input_ids, _ = prompts(1, 5, seed=11)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens)
    out = self_speculative_generate(model, input_ids, 2, max_new_tokens, num_draft_tokens=4)
    assert torch.equal(out.sequences, expected)


def test_eos_inside_a_draft_stops_like_generate(model):
    # Make a token that greedy decoding produces mid-way the EOS, then check generate and the drafts stop alike
    input_ids, attention_mask = prompts(2, 8, seed=3, pads=(2, 0))
    free = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20)
    eos = int(free[1, input_ids.shape[1] + 6])
    kwargs = dict(eos_token_id=eos, pad_token_id=0)
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20, **kwargs)
    assert expected.shape[1] < free.shape[1] or (expected == 0).any()  # EOS did change the output
    for draft_exit in (1, NUM_LAYERS - 1):
        out = self_speculative_generate(
            model, input_ids, draft_exit, 20, attention_mask=attention_mask, num_draft_tokens=5, **kwargs
        )
        assert torch.equal(out.sequences, expected)


def test_peft_wrapped_model_matches_generate():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    input_ids, _ = prompts(1, 6, seed=2)
    expected = model.generate(input_ids=input_ids, do_sample=False, max_new_tokens=10)
    out = self_speculative_generate(model, input_ids, 2, 10, num_draft_tokens=3)
    assert torch.equal(out.sequences, expected)


def test_sampling_follows_the_full_model_distribution():
    """Law of the 2nd and 3rd sampled tokens vs the exact full model (chi-square) on a 5-token vocabulary.

    A batch of identical prompts goes through rejection and residual sampling (the batch keeps the fewest accepted
    drafts); single prompts also take the all-accepted path that samples a bonus token from the full model.
    """
    pytest.importorskip("scipy")
    vocab, prompt = LAW_VOCAB, LAW_PROMPT
    model, exact = law_model_and_law()
    kwargs = dict(do_sample=True, eos_token_id=[], pad_token_id=0)
    batched = self_speculative_generate(
        model, prompt.repeat(1500, 1), 1, 3, num_draft_tokens=2, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert batched.stats.drafted > 0
    assert chi_square_p(batched.sequences, exact, vocab) > 1e-3
    generator = torch.Generator().manual_seed(1)
    singles = [
        self_speculative_generate(model, prompt, 1, 3, num_draft_tokens=2, generator=generator, **kwargs)
        for _ in range(200)
    ]
    assert sum(out.stats.accepted for out in singles) > 30  # the all-accepted path was taken
    assert chi_square_p(torch.cat([out.sequences for out in singles]), exact, vocab) > 1e-3
    # The same test rejects the draft exit's own distribution, so it has the power to fail
    torch.manual_seed(0)
    draft_only = extract_submodel(model, 1).generate(prompt.repeat(1500, 1), do_sample=True, max_new_tokens=3, top_k=0)
    assert chi_square_p(draft_only, exact, vocab) < 1e-3


def test_sampling_batch_one_is_consistent():
    """Batch 1 with temperature and top-p: reproducible per seed, cycles keep several drafts, and every token lies in
    the full model's nucleus at its position (one outside it would mean a draft's or an unfiltered law leaked)."""
    model = tiny_model("qwen2")
    input_ids, _ = prompts(1, 6, seed=4)
    kwargs = dict(do_sample=True, temperature=0.7, top_p=0.5, eos_token_id=[])
    runs = [
        self_speculative_generate(model, input_ids, 2, 30, generator=torch.Generator().manual_seed(1), **kwargs)
        for _ in range(2)
    ]
    out = runs[0]
    assert out.sequences.shape == (1, 36) and torch.equal(out.sequences, runs[1].sequences)
    assert out.stats.accepted > out.stats.cycles  # more than one kept draft per cycle on average
    with torch.no_grad():
        logits = model(out.sequences).logits[0, input_ids.shape[1] - 1 : -1]  # (30, V): the law of each new token
    nucleus = sampling_probs(logits, 0.7, 0.5) > 0
    assert nucleus.float().mean() < 0.7  # top-p drops a good part of the vocabulary, so the check can fail
    assert bool(nucleus.gather(-1, out.sequences[0, input_ids.shape[1] :, None]).all())


@pytest.mark.parametrize("batch, pads", [(1, ()), (3, (4, 0, 1))])
def test_greedy_with_draft_stops_matches_generate(model, batch, pads):
    input_ids, attention_mask = prompts(batch, 9, seed=5, pads=pads)
    mask = attention_mask if batch > 1 else None
    expected = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=13)
    # A threshold at the median of the draft exit's batch-minimum confidence along the output: some cycles stop
    with torch.no_grad():
        hidden = model(expected, output_hidden_states=True).hidden_states[2][:, input_ids.shape[1] - 1 : -1]
        confidence = (
            exit_confidence(DecoderStack(model).head.logits_from_raw(hidden).flatten(0, 1))
            .view(batch, -1)
            .min(0)
            .values
        )
    for threshold in (0.0, float(confidence.median())):
        out = self_speculative_generate(
            model, input_ids, 2, 13, attention_mask=mask, num_draft_tokens=4, draft_stop_threshold=threshold
        )
        assert torch.equal(out.sequences, expected), threshold
    assert out.stats.draft_stops > 0 and out.stats.drafted > 0
    never = self_speculative_generate(model, input_ids, 2, 13, attention_mask=mask, draft_stop_threshold=0.0)
    assert never.stats.draft_stops == 0  # a max probability is always above 0


@pytest.mark.parametrize("batch, pads", [(1, ()), (2, (3, 0))])
def test_greedy_with_early_draft_exits_matches_generate(model, batch, pads):
    """Drafts from exit 1 when it is confident, else from exit 3: positions at mixed depths, outputs exact."""
    # The tiny Qwen2 is most confident at exit 1 at every position, so exit 3 never drafts there: exactness only
    can_mix = model.config.model_type != "qwen2"
    mixed = False
    for seed in range(8 if can_mix else 1):  # until some prompt and threshold draft from both exits
        input_ids, attention_mask = prompts(batch, 9, seed=seed, pads=pads)
        mask = attention_mask if batch > 1 else None
        expected = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=15)
        with torch.no_grad():
            states = model(expected, output_hidden_states=True).hidden_states
            logits = [DecoderStack(model).head.logits_from_raw(states[k][:, input_ids.shape[1] - 1 :]) for k in (1, 3)]
        for threshold in exit_confidence(torch.cat(logits).flatten(0, 1)).unique().tolist():
            out = self_speculative_generate(
                model, input_ids, 3, 15, attention_mask=mask, num_draft_tokens=5, draft_stop_threshold=threshold,
                early_draft_exits=[1],
            )  # fmt: skip
            assert torch.equal(out.sequences, expected), (seed, threshold)
            assert sum(out.stats.drafts_by_exit.values()) == out.stats.drafted
            mixed |= out.stats.drafts_by_exit.get(1, 0) > 0 and out.stats.drafts_by_exit.get(3, 0) > 0
        if mixed:
            break
    assert mixed or not can_mix, "no prompt and threshold drafted from both exits"


@pytest.mark.parametrize("draft_exit, early, seed", [(1, [], 2), (2, [1], 3)])
def test_sampling_with_draft_stops_follows_the_full_model_distribution(draft_exit, early, seed):
    """Draft stops (and drafting from an earlier exit first) only choose what gets verified: the law stays exact."""
    pytest.importorskip("scipy")
    vocab, prompt = LAW_VOCAB, LAW_PROMPT
    model, exact = law_model_and_law()
    generator = torch.Generator().manual_seed(seed)
    runs = [
        self_speculative_generate(
            model, prompt, draft_exit, 3, num_draft_tokens=2, do_sample=True, eos_token_id=[], generator=generator,
            draft_stop_threshold=0.3, early_draft_exits=early,
        )
        for _ in range(1200)
    ]  # fmt: skip
    assert sum(out.stats.accepted for out in runs) > 100
    if early:  # the early exit drafts the confident tokens, the draft exit the others
        by_exit = [sum(out.stats.drafts_by_exit.get(k, 0) for out in runs) for k in [*early, draft_exit]]
        assert min(by_exit) > 50, by_exit
    else:
        assert sum(out.stats.draft_stops for out in runs) > 100
    assert chi_square_p(torch.cat([out.sequences for out in runs]), exact, vocab) > 1e-3


def test_choose_draft_length_grows_with_acceptance():
    lengths = [choose_draft_length(a, 15, 30, 3.0, 12) for a in (0.3, 0.7, 0.9, 0.99)]
    assert lengths == sorted(lengths) and lengths[0] == 1 and lengths[-1] > 3


def test_choose_draft_length_drafts_longer_with_a_cheaper_draft_head():
    # A drafting head at a tenth of the verifying head's cost makes each extra draft cheaper, so drafts get longer
    full = [choose_draft_length(a, 24, 30, 8.0, 12) for a in (0.9, 0.95)]
    cheap = [choose_draft_length(a, 24, 30, 8.0, 12, draft_head_cost=0.8) for a in (0.9, 0.95)]
    assert all(c >= f for c, f in zip(cheap, full, strict=True)) and cheap != full
    assert choose_draft_length(0.95, 24, 30, 8.0, 12, draft_head_cost=8.0) == full[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(draft_exit=0), "draft_exit"),
        (dict(draft_exit=NUM_LAYERS), "draft_exit"),
        (dict(draft_exit=1.5), "draft_exit"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_draft_tokens=0), "num_draft_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(draft_stop_threshold=1.0), "draft_stop_threshold"),
        (dict(draft_stop_threshold=-0.1), "draft_stop_threshold"),
        (dict(early_draft_exits=[1]), "needs `draft_stop_threshold`"),
        (dict(early_draft_exits=[1, 1], draft_stop_threshold=0.5), "increasing"),
        (dict(early_draft_exits=[0], draft_stop_threshold=0.5), "increasing"),
        (dict(early_draft_exits=[2], draft_stop_threshold=0.5), "below `draft_exit`"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model = tiny_model("llama")
    input_ids, _ = prompts(1, 4)
    arguments = dict(draft_exit=2, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        self_speculative_generate(model, input_ids, **arguments)


def test_padding_without_attention_mask_raises():
    model = tiny_model("llama")
    input_ids, _ = prompts(2, 6, pads=(2, 0))
    with pytest.raises(ValueError, match="attention_mask"):
        self_speculative_generate(model, input_ids, 2, 4)
    right_padded = torch.ones_like(input_ids)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        self_speculative_generate(model, input_ids, 2, 4, attention_mask=right_padded)


@pytest.mark.parametrize("arch", ["opt", "phi"])
def test_unsupported_architecture_is_named(arch):
    model = tiny_model(arch)
    with pytest.raises(ValueError, match=type(model).__name__):
        self_speculative_generate(model, prompts(1, 4)[0], 1, 4)
