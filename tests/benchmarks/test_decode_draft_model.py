"""`python -m benchmarks.decode_cost draft-model` (benchmarks/decode_draft_model.py): the three ways of drafting with
an exit decode greedy's tokens, transformers' drafts are counted right, and the table rows hold what was measured."""

import argparse
import copy

import pytest
from inference_helpers import prompts
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from benchmarks.decode_draft_model import (
    count_assisted_drafts,
    default_draft_exits,
    extract_drafts,
    methods_for,
    table_rows,
)
from benchmarks.decode_harness import run_decode_benchmark

ARGS = argparse.Namespace(max_new_tokens=12, num_draft_tokens="adaptive")


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    model.config.soft_exit_layers = [2, 3, 4]
    model.save_pretrained(tmp_path / "full")
    tiny_tokenizer().save_pretrained(tmp_path / "full")
    return tmp_path


def test_counts_every_draft_and_accepts_all_from_an_identical_draft():
    model = tiny_model("llama")
    input_ids, _ = prompts(1, 6)
    with count_assisted_drafts({}) as counters:
        out = model.generate(input_ids, do_sample=False, max_new_tokens=16, assistant_model=copy.deepcopy(model))
    # An identical draft is always right: every drafted token is accepted, and all but one token per cycle is a draft
    assert counters["drafted"] > 0 and counters["accepted"] == counters["drafted"]
    assert counters["accepted"] < out.shape[1] - input_ids.shape[1]
    with count_assisted_drafts({}) as counters:
        model.generate(input_ids, do_sample=False, max_new_tokens=16, assistant_early_exit=1)
    assert 0 <= counters["accepted"] <= counters["drafted"] and counters["drafted"] > 0


def test_three_ways_agree_with_greedy_and_fill_the_table(saved):
    model = AutoModelForCausalLM.from_pretrained(saved / "full").eval()
    assert default_draft_exits(4, [2, 3, 4]) == [2, 3] and default_draft_exits(30, None) == [15, 22]
    folders = extract_drafts(str(saved / "full"), [2], str(saved / "drafts"))
    drafts = {2: AutoModelForCausalLM.from_pretrained(folders[2]).eval()}
    methods = methods_for(model, drafts, ARGS)
    assert [m.mode for m in methods] == ["greedy", "self-speculative", "assistant_model", "assistant_early_exit"]
    results = run_decode_benchmark(model, tiny_tokenizer(), ["abc", "hello"], methods, (1,), warmup=False)
    memory = {m.setting: {"peak_mb": 100.0 + i, "loaded_mb": 90.0} for i, m in enumerate(methods)}
    memory["greedy"] = {"peak_mb": 100.0, "loaded_mb": 90.0}
    rows = table_rows(methods, results, memory, {2: 0.1})
    assert all(row["tokens_equal_greedy"] == 1.0 for row in rows)
    assert [row["acceptance"] is None for row in rows] == [True, False, False, False]
    assert all(0 <= row["acceptance"] <= 1 for row in rows[1:])
    assert [row["draft_weights_mb"] for row in rows] == [0.0, 0.0, 0.1, 0.0]
    assert [row["peak_vs_greedy_mb"] for row in rows] == [0.0, 1.0, 2.0, 3.0]
    assert [row["decode_extra_mb"] for row in rows] == [10.0, 11.0, 12.0, 13.0]
