"""`frequent_token_ids`, `SubsetHead`, and the vocabulary subsets of both decoders (exactness kept)."""

import pytest
import torch
from inference_helpers import LAW_PROMPT, LAW_VOCAB, chi_square_p, law_model_and_law, prompts, reference_dynamic
from tiny_models import GEN_ARCHS, NUM_LAYERS, VOCAB, tiny_model, tiny_tokenizer

from soft_peft import dynamic_generate, self_speculative_generate
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.vocab import SubsetHead, frequent_token_ids


@pytest.fixture(scope="module", params=GEN_ARCHS)
def model(request):
    return tiny_model(request.param)


def test_frequent_token_ids_ranks_by_count_then_id_and_adds_specials():
    tokenizer = tiny_tokenizer()
    a, b, c = (tokenizer.convert_tokens_to_ids(ch) for ch in "abc")
    ids = frequent_token_ids(tokenizer, ["aaab", "bc", "c"], size=2)  # counts a 3, b 2, c 2: b wins the tie by id
    assert ids.tolist() == sorted({a, b, *tokenizer.all_special_ids})
    everything = frequent_token_ids(tokenizer, "abc", size=1000)  # fewer tokens seen than asked: only those
    assert everything.tolist() == sorted({a, b, c, *tokenizer.all_special_ids})


@pytest.mark.parametrize("size, texts, match", [(0, ["a"], "size"), (True, ["a"], "size"), (4, [], "empty")])
def test_frequent_token_ids_bad_arguments(size, texts, match):
    with pytest.raises(ValueError, match=match):
        frequent_token_ids(tiny_tokenizer(), texts, size=size)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "cohere"])  # Cohere: its logit_scale is applied to the slice
def test_subset_head_equals_full_logits_sliced(arch):
    model = tiny_model(arch)
    stack = DecoderStack(model)
    ids = torch.tensor([0, 5, 17, 42, VOCAB - 1])
    subset = SubsetHead(stack.head, ids)
    hidden = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(subset.logits_from_raw(hidden), stack.head.logits_from_raw(hidden)[..., ids])
    probs = torch.rand(2, ids.numel())
    full = subset.to_vocab(probs)
    outside = torch.ones(VOCAB, dtype=torch.bool).index_fill_(0, ids, False)
    assert full.shape == (2, VOCAB) and torch.equal(full[:, ids], probs) and not full[:, outside].any()


def test_subset_head_of_an_adapted_head_warns_and_stays_correct():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():  # the trained copy now differs from the base head it wraps
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    stack = DecoderStack(model)
    ids = torch.tensor([1, 2, 3])
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        subset = SubsetHead(stack.head, ids)
    hidden = torch.randn(1, 2, base.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(subset.logits_from_raw(hidden), stack.head.logits_from_raw(hidden)[..., ids])
        base_logits = torch.nn.functional.linear(
            stack.head.normed_from_raw(hidden), stack.head.lm_head.original_module.weight
        )
    assert not torch.allclose(subset.logits_from_raw(hidden), base_logits[..., ids])


@pytest.mark.parametrize(
    "ids, match",
    [([], "non-empty"), ([[1, 2]], "1-D"), ([1.0, 2.0], "dtype"), ([1, VOCAB], "outside"), ([-1], "outside"),
     ([3, 3], "repeated")],
)  # fmt: skip
def test_subset_head_bad_ids_raise(ids, match):
    with pytest.raises(ValueError, match=match):
        SubsetHead(DecoderStack(tiny_model("llama")).head, torch.tensor(ids) if ids else ids)


def _tokens_greedy_uses(model, input_ids, attention_mask, max_new_tokens):
    expected = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens)
    return expected, expected[:, input_ids.shape[1] :].unique()


@pytest.mark.parametrize("draft_exit, num_draft_tokens", [(1, 3), (3, "adaptive")])
def test_speculative_with_draft_vocab_matches_generate(model, draft_exit, num_draft_tokens):
    """Half of the tokens greedy emits cannot be drafted: those drafts are rejected, the output stays identical."""
    input_ids, attention_mask = prompts(2, 8, seed=9, pads=(3, 0))
    expected, used = _tokens_greedy_uses(model, input_ids, attention_mask, 16)
    draft_vocab = torch.tensor(sorted(set(range(0, VOCAB, 2)) | set(used[::2].tolist())))
    assert not set(used.tolist()) <= set(draft_vocab.tolist())
    out = self_speculative_generate(
        model, input_ids, draft_exit, 16, attention_mask, num_draft_tokens=num_draft_tokens, draft_vocab=draft_vocab
    )
    assert torch.equal(out.sequences, expected)
    assert out.stats.accepted < out.stats.drafted


def test_shuffled_whole_vocabulary_drafts_like_no_subset(model):
    """Column j of the subset scores token_ids[j]: a permuted whole vocabulary must draft the very same tokens."""
    input_ids, _ = prompts(1, 8, seed=2)
    plain = self_speculative_generate(model, input_ids, 2, 16, num_draft_tokens=3)
    shuffled = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    subset = self_speculative_generate(model, input_ids, 2, 16, num_draft_tokens=3, draft_vocab=shuffled)
    assert torch.equal(plain.sequences, subset.sequences)
    assert (plain.stats.drafted, plain.stats.accepted) == (subset.stats.drafted, subset.stats.accepted)


def test_speculative_sampling_with_draft_vocab_follows_the_full_model():
    """Drafts from 3 of 5 tokens: rejections must sample the other 2 from the residual, and the law stays exact."""
    pytest.importorskip("scipy")
    vocab, prompt = LAW_VOCAB, LAW_PROMPT
    model, exact = law_model_and_law()
    out = self_speculative_generate(
        model, prompt.repeat(1500, 1), 1, 3, num_draft_tokens=2, do_sample=True, eos_token_id=[], pad_token_id=0,
        generator=torch.Generator().manual_seed(0), draft_vocab=[0, 2, 4],
    )  # fmt: skip
    assert out.stats.drafted > 0
    assert chi_square_p(out.sequences, exact, vocab) > 1e-3


def _subset_that_blocks_exits(model, input_ids, attention_mask, exits, max_new_tokens):
    """A threshold and a subset lacking some early-exited tokens, such that the subset rule changes the exits.

    Returns:
        ``(threshold, subset, reference sequences, reference depths)`` under the subset rule.
    """
    for threshold in (0.015, 0.02, 0.025, 0.03, 0.04, 0.05):
        plain, plain_depths = reference_dynamic(model, input_ids, attention_mask, exits, threshold, max_new_tokens)
        new = plain[:, input_ids.shape[1] :]
        early = {int(t) for step, depth in enumerate(plain_depths) if depth < NUM_LAYERS for t in new[:, step]}
        for stride in (1, 2, 3):
            subset = torch.tensor([t for t in range(0, VOCAB, stride) if t not in early])
            expected, depths = reference_dynamic(
                model, input_ids, attention_mask, exits, threshold, max_new_tokens, check_vocab=subset
            )
            if early and depths != plain_depths:
                return threshold, subset, expected, depths
    raise AssertionError("no threshold where the subset rule changes the exits for this model")


def test_dynamic_with_check_vocab_matches_reference(model):
    """Pre-checks on a subset that lacks tokens the plain rule exits with: the exits change, as the reference says."""
    input_ids, attention_mask = prompts(2, 8, seed=7, pads=(2, 0))
    exits = [1, 2, 3]
    threshold, subset, expected, depths = _subset_that_blocks_exits(model, input_ids, attention_mask, exits, 10)
    out = dynamic_generate(model, input_ids, exits, threshold, 10, attention_mask, check_vocab=subset, eos_token_id=[])
    assert out.stats.exits_taken.tolist() == depths
    assert torch.equal(out.sequences, expected)
    assert out.stats.full_checks < out.stats.checks


def test_dynamic_with_the_whole_vocabulary_as_subset_changes_nothing(model):
    input_ids, attention_mask = prompts(1, 8, seed=3)
    plain = dynamic_generate(model, input_ids, [1, 2, 3], 0.03, 10, eos_token_id=[])
    subset = dynamic_generate(model, input_ids, [1, 2, 3], 0.03, 10, eos_token_id=[], check_vocab=torch.arange(VOCAB))
    assert torch.equal(plain.sequences, subset.sequences)
    assert plain.stats.exits_taken.tolist() == subset.stats.exits_taken.tolist()
    assert subset.stats.checks == plain.stats.checks and subset.stats.full_checks <= subset.stats.checks


def test_dynamic_exit_on_subset_matches_reference(model):
    """Early exits decided and emitted on the subset alone: no full head below the last layer, as in the reference."""
    input_ids, attention_mask = prompts(2, 8, seed=7, pads=(2, 0))
    exits = [1, 2, 3]
    subset = torch.arange(0, VOCAB, 2)
    for threshold in (0.02, 0.03, 0.05):
        expected, depths = reference_dynamic(
            model, input_ids, attention_mask, exits, threshold, 10, check_vocab=subset, exit_on_subset=True
        )
        if min(depths) < NUM_LAYERS:
            break
    else:
        raise AssertionError("no threshold exits early on the subset for this model")
    out = dynamic_generate(
        model, input_ids, exits, threshold, 10, attention_mask, check_vocab=subset, exit_on_subset=True,
        eos_token_id=[],
    )  # fmt: skip
    assert out.stats.exits_taken.tolist() == depths
    assert torch.equal(out.sequences, expected)
    assert out.stats.full_checks == 0
    early = out.sequences[:, input_ids.shape[1] :][:, out.stats.exits_taken < NUM_LAYERS]
    assert bool(torch.isin(early, subset).all())


def test_dynamic_exit_on_subset_with_threshold_one_is_greedy(model):
    input_ids, attention_mask = prompts(2, 8, seed=5, pads=(0, 3))
    out = dynamic_generate(
        model, input_ids, [1, 2], 1.0, 8, attention_mask, check_vocab=[0, 1, 2], exit_on_subset=True, eos_token_id=[]
    )
    greedy = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(out.sequences, greedy)


def test_dynamic_exit_on_subset_needs_a_subset(model):
    input_ids, _ = prompts(1, 4, seed=0)
    with pytest.raises(ValueError, match="check_vocab"):
        dynamic_generate(model, input_ids, [1], 0.5, 2, exit_on_subset=True)


def test_dynamic_exit_on_subset_samples_only_subset_tokens_at_early_exits(model):
    input_ids, _ = prompts(1, 6, seed=2)
    subset = torch.arange(0, VOCAB, 3)
    out = dynamic_generate(
        model, input_ids, [1, 2], 0.01, 12, do_sample=True, generator=torch.Generator().manual_seed(0),
        check_vocab=subset, exit_on_subset=True, eos_token_id=[],
    )  # fmt: skip
    early = out.stats.exits_taken < NUM_LAYERS
    assert bool(early.any()) and out.stats.full_checks == 0
    assert bool(torch.isin(out.sequences[0, input_ids.shape[1] :][early], subset).all())


def test_subset_head_refuses_anything_but_the_exit_head_and_names_the_fix():
    stack = DecoderStack(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"got DecoderStack; pass `stack.head`"):
        SubsetHead(stack, [0, 1])
    with pytest.raises(ValueError, match=r"got Linear; pass `find_exit_head\(model\)`"):
        SubsetHead(torch.nn.Linear(2, 2), [0, 1])
