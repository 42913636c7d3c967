"""`python -m benchmarks.decode_cost ceiling` (benchmarks/decode_ceiling.py): its timed cycles do the work of real
self-speculative cycles, and its perfect-stop replay counts cycles and right drafts as a plain reference does."""

import pytest
import torch
from tiny_models import NUM_LAYERS, VOCAB, tiny_model, tiny_tokenizer

from benchmarks import decode_ceiling as speculative_ceiling
from benchmarks.decode_cost import main
from soft_peft import self_speculative_generate
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.vocab import SubsetHead


def _count_calls(modules):
    calls = [0] * len(modules)
    handles = [
        module.register_forward_hook(lambda *_, index=i: calls.__setitem__(index, calls[index] + 1))
        for i, module in enumerate(modules)
    ]
    return calls, handles


def _model_whose_exit_equals_the_last(draft_exit):
    model = tiny_model("llama").eval()
    with torch.no_grad():  # layers above the draft exit add nothing to the residual stream: every draft is kept
        for layer in DecoderStack(model).layers[draft_exit:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("draft_exit,drafts", [(1, 1), (2, 3)])
def test_timed_cycle_runs_the_layers_of_one_accepted_cycle(draft_exit, drafts):
    model = _model_whose_exit_equals_the_last(draft_exit)
    stack = DecoderStack(model)
    context = 6
    cache = stack.new_cache()
    with torch.inference_mode():
        inputs = stack.step_inputs(None, 0, context, 1)
        stack.run_layers(stack.embed(torch.arange(context)[None], inputs), 1, NUM_LAYERS, inputs, cache)
        calls, handles = _count_calls(stack.layers)
        draft = speculative_ceiling.draft_token_fn(stack)
        seconds = speculative_ceiling.cycle_timer(stack, cache, context, draft)(draft_exit, drafts)
    for handle in handles:
        handle.remove()
    assert seconds > 0
    # The cache is back where it was, ready for the next timing
    assert [stack.cache_length(cache, layer) for layer in range(1, NUM_LAYERS + 1)] == [context] * NUM_LAYERS
    assert calls == [drafts + 1] * draft_exit + [1] * (NUM_LAYERS - draft_exit)
    # The decoder's own per-layer counts for one all-accepted cycle of `drafts` drafts, prefill subtracted
    out = self_speculative_generate(
        model, torch.arange(context)[None], draft_exit, drafts + 2, num_draft_tokens=drafts
    )
    assert (out.stats.cycles, out.stats.accepted) == (1, drafts)
    assert calls == [count - 1 for count in out.stats.layer_forwards]


@pytest.mark.parametrize("stopped", [False, True])
def test_a_stopped_cycle_pays_one_more_draft_head(stopped):
    stack = DecoderStack(tiny_model("llama").eval())
    cache = stack.new_cache()
    heads = []
    with torch.inference_mode():
        inputs = stack.step_inputs(None, 0, 4, 1)
        stack.run_layers(stack.embed(torch.arange(4)[None], inputs), 1, NUM_LAYERS, inputs, cache)
        timer = speculative_ceiling.cycle_timer(stack, cache, 4, lambda h: heads.append(h.shape))
        timer(2, 3, stopped)
    assert len(heads) == 3 + stopped


def _reference_perfect_stop(hits, max_draft):
    # One cycle per wrong draft, per max_draft right drafts in a row, and for what is left at the end
    cycles, run = [], 0
    for index, hit in enumerate(hits):
        if run == max_draft:  # this position is the cycle's verified bonus token
            cycles.append((run, False))
            run = 0
        elif not hit:
            cycles.append((run, True))
            run = 0
        else:
            run += 1
            if index == len(hits) - 1:
                cycles.append((run, False))
    return cycles


@pytest.mark.parametrize(
    "hits", [[], [True] * 7, [False] * 3, [True, False, True, True, False], [True] * 3 + [False] + [True] * 5]
)
@pytest.mark.parametrize("max_draft", [1, 2, 3])
def test_perfect_stop_replay_matches_a_reference(hits, max_draft):
    seen = []
    spent, tokens, cycles = speculative_ceiling.perfect_stop_seconds(
        hits, max_draft, lambda drafts, stopped: seen.append((drafts, stopped)) or 10.0 + drafts
    )
    expected = _reference_perfect_stop(hits, max_draft)
    assert seen == expected
    assert cycles == len(expected)
    assert tokens == sum(drafts + 1 for drafts, _ in expected)
    assert spent == sum(10.0 + drafts for drafts, _ in expected)


@pytest.mark.parametrize("subset_ids", [None, list(range(0, 101, 2))])
def test_draft_hits_are_the_exits_drafts_against_the_next_token(subset_ids):
    model = tiny_model("llama").eval()
    stack = DecoderStack(model)
    subset = None if subset_ids is None else SubsetHead(stack.head, subset_ids)
    draft = speculative_ceiling.draft_token_fn(stack, subset)
    allowed = torch.full((VOCAB,), -torch.inf)
    allowed[subset_ids or slice(None)] = 0
    with torch.inference_mode():
        prefix = torch.tensor([[5, 9, 2, 7]])
        # The first replayed token is exit 1's own draft, so at least one hit is certain
        first = draft(model(prefix, output_hidden_states=True).hidden_states[1][0, -1:])
        sequence = torch.cat([prefix, first[None], torch.tensor([[1, 3, 8]])], dim=1)
        hits = speculative_ceiling.draft_hits(stack, sequence, 3, [3, 1], draft)
        states = model(sequence, output_hidden_states=True).hidden_states
    assert sorted(hits) == [1, 3]
    assert hits[1][0] is True
    for k, row in hits.items():
        logits = stack.head.logits_from_raw(states[k][0])  # hidden_states[k]: the raw state after k layers (k < L)
        drafts = (logits + allowed).argmax(-1)  # the best token the draft vocabulary allows
        assert row == [bool(drafts[t] == sequence[0, t + 1]) for t in range(3, sequence.shape[1] - 1)]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_main_writes_both_tables(saved_model, gsm8k_path, tmp_path):
    output = tmp_path / "ceiling.md"
    args = ["--model_name_or_path", str(saved_model), "--data", str(gsm8k_path), "--vocab_size", "50"]
    args += ["--rounds", "1", "--context", "8", "--num_prompts", "2", "--max_new_tokens", "6", "--max_draft", "2"]
    assert main(["ceiling", *args, "--draft_exits", "1,3", "--output", str(output)]) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ")]
    assert rows[0] == "| draft exit | g=1 | g=2 |"
    assert [row.split(" | ")[0] for row in rows[1:3]] == ["| 1", "| 3"]
    assert rows[3].startswith("| draft exit | drafts equal to greedy's token")
    assert [row.split(" | ")[0] for row in rows[4:]] == ["| 1", "| 3"]


def test_draft_exits_outside_the_model_are_refused(saved_model):
    with pytest.raises(SystemExit, match=f"in 1..{NUM_LAYERS - 1}"):
        main(["ceiling", "--model_name_or_path", str(saved_model), "--draft_exits", "4"])


def test_a_random_init_shape_times_every_accepted_cycle_and_reports_the_first_bound(tmp_path, capsys):
    output = tmp_path / "ceiling.md"
    argv = ["ceiling", "--shape", "tiny", "--draft_exits", "2,4", "--max_draft", "2", "--rounds", "1"]
    assert main([*argv, "--new_tokens", "2", "--context", "8", "--output", str(output)]) == 0
    text = output.read_text()
    assert text.startswith("Model: random-init `tiny` (8 layers), torch.bfloat16") and "full head" in text
    rows = [line for line in text.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert len(rows) == 2 and all(row.count("|") == 4 for row in rows)  # g = 1, 2
    assert "perfect draft stop" not in text  # random weights: no prompts, no replay
    assert "python -m benchmarks.decode_cost ceiling --shape tiny" in capsys.readouterr().out
