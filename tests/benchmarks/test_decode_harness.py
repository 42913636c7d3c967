"""`benchmarks/decode_harness.py` (behind `python -m benchmarks.decode_cost`): the decoding benchmark's methods,
interleaved runs and table, with tiny settings."""

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from benchmarks.decode_harness import (
    MethodResult,
    build_methods,
    format_table,
    parse_draft_stop_thresholds,
    parse_early_draft_exit_sets,
    projected_speedup,
    run_decode_benchmark,
    summary_rows,
)


def test_benchmark_functions():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    methods = build_methods(model, 4, [2], "adaptive", [2], [1.0], [2])
    results = run_decode_benchmark(model, tokenizer, ["ab", "cde"], methods, batch_sizes=(1, 2), warmup=False)
    assert [r.mode for r in results if r.batch_size == 2] == ["greedy", "self-speculative", "dynamic"]
    table = format_table(results, tokenizer, [None, None])
    # Exact decoders agree with greedy on every prompt (threshold 1.0 never exits early)
    for line in table.splitlines()[2:]:
        assert "| 1.00 | 1.000 |" in line, line
    assert torch.is_tensor(methods[0].run(torch.tensor([[5, 6]]), None)[0])


def test_projected_speedup_by_hand_and_from_a_real_run():
    # 10 cycles, 30 drafts from exit 1 of 4 (cost 30 / 4 forwards), 24 accepted: 34 tokens for 17.5 forwards
    assert projected_speedup({"cycles": 10, "accepted": 24, "draft_cost": 7.5}) == pytest.approx(34 / 17.5)
    assert projected_speedup({}) is None  # greedy and dynamic rows have no cycles
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    methods = build_methods(model, 6, [2], "adaptive", None, [], [], modes=["self-speculative"])
    results = run_decode_benchmark(model, tokenizer, ["ab"], methods, batch_sizes=(1,), warmup=False)
    greedy, speculative = summary_rows(results, tokenizer, [None])
    assert greedy["accepted_per_cycle"] is None and greedy["projected_speedup"] is None
    counters = results[1].counters
    assert counters["cycles"] > 0 and counters["draft_cost"] == pytest.approx(counters["drafted"] * 2 / 4)
    assert speculative["accepted_per_cycle"] == pytest.approx(counters["accepted"] / counters["cycles"])


def test_benchmark_methods_take_a_vocabulary_and_a_mode_filter():
    model = tiny_model("llama")
    vocab = torch.arange(0, 101, 2)
    methods = build_methods(model, 4, [2], 3, [2], [0.9], [2], vocab=vocab, modes=["dynamic"])
    assert [m.mode for m in methods] == ["greedy", "dynamic"]
    assert methods[1].setting.endswith("51-token vocab")
    with pytest.raises(ValueError, match="Unknown modes"):
        build_methods(model, 4, [2], 3, [2], [0.9], [2], modes=["speculative"])
    both = build_methods(
        model, 4, [2], 3, [2], [0.9], [2], vocab=vocab, modes=["dynamic"], dynamic_rules=["exact", "subset"]
    )
    assert [m.setting for m in both[1:]] == [
        "threshold 0.9, kv recompute, 51-token vocab",
        "threshold 0.9, kv recompute, exits on the 51-token vocab",
    ]
    results = run_decode_benchmark(model, tiny_tokenizer(), ["ab"], both, batch_sizes=(1,), warmup=False)
    assert all(r.tokens == 4 for r in results)
    only = build_methods(
        model, 4, [2], 3, [2], [0.9, 0.5], [2], vocab=vocab, modes=["dynamic"], dynamic_rules=["subset"]
    )
    assert [m.setting.split(",")[0] for m in only] == ["generate(do_sample=False)", "threshold 0.9", "threshold 0.5"]
    with pytest.raises(ValueError, match="needs `vocab`"):
        build_methods(model, 4, [2], 3, [2], [0.9], [2], modes=["dynamic"], dynamic_rules=["subset"])
    assert parse_draft_stop_thresholds("none, 0.5,") == [None, 0.5]
    stops = build_methods(
        model, 4, [2], 3, [2], [0.9], [2], modes=["self-speculative"], draft_stop_thresholds=[None, 0.5]
    )
    assert [m.setting for m in stops[1:]] == [
        "draft exit 2, 3 drafts",
        "draft exit 2, 3 drafts, stop at confidence <= 0.5",
    ]
    results = run_decode_benchmark(model, tiny_tokenizer(), ["ab"], stops, batch_sizes=(1,), warmup=False)
    assert all(r.outputs == results[0].outputs for r in results)  # exact either way
    assert parse_early_draft_exit_sets("none/1/1,2") == [(), (1,), (1, 2)]
    early = build_methods(
        model, 4, [2, 3], 3, [2], [0.9], [2], modes=["self-speculative"], draft_stop_thresholds=[None, 0.5],
        early_draft_exit_sets=[(), (1,), (1, 2)],
    )  # fmt: skip
    assert [m.setting.split("3 drafts", 1)[1] for m in early[1:]] == [
        "",  # exit 2, no stop: early exits need a stop
        ", stop at confidence <= 0.5",
        ", stop at confidence <= 0.5, drafts from 1 first",  # (1, 2) is (1,) below exit 2: run once
        "",
        ", stop at confidence <= 0.5",
        ", stop at confidence <= 0.5, drafts from 1 first",
        ", stop at confidence <= 0.5, drafts from 1,2 first",
    ]
    results = run_decode_benchmark(model, tiny_tokenizer(), ["ab"], early, batch_sizes=(1,), warmup=False)
    assert all(r.outputs == results[0].outputs for r in results)
    with pytest.raises(ValueError, match="dynamic_rules"):
        build_methods(model, 4, [2], 3, [2], [0.9], [2], modes=["dynamic"], dynamic_rules=["fast"])


def test_benchmark_leaves_the_tokenizers_padding_side_alone():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    tokenizer.padding_side = "right"
    methods = build_methods(model, 3, [2], 2, [2], [1.0], [], modes=["self-speculative"])
    results = run_decode_benchmark(model, tokenizer, ["ab", "cdef"], methods, batch_sizes=(2,), warmup=False)
    assert tokenizer.padding_side == "right"
    # Left padding was still used: the exact decoder agrees with greedy on both prompts
    assert results[1].outputs == results[0].outputs and len(results[0].outputs) == 2


def test_gsm8k_accuracy_compares_numbers():
    tokenizer = tiny_tokenizer()
    outputs = [tokenizer("so #### 18.0", add_special_tokens=False).input_ids]
    outputs.append(tokenizer("so #### 17", add_special_tokens=False).input_ids)
    greedy = MethodResult("greedy", "-", 1, seconds=1.0, tokens=4, outputs=outputs)
    table = format_table([greedy], tokenizer, ["Half of 36. #### 18", "#### 18"])
    assert table.splitlines()[2].endswith("| 0.50 |")  # "18.0" equals "18"; "17" does not
