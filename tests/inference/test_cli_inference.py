"""`soft-peft generate` and `soft-peft extract` on a saved tiny model (the `bench` subcommand shares the benchmark's
code, which `test_benchmark_functions` runs with tiny settings)."""

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from soft_peft.cli import main as soft_peft_main
from soft_peft.cli.decode_flags import parse_draft_stop_thresholds, parse_early_draft_exit_sets
from soft_peft.inference.benchmark import (
    build_methods,
    format_table,
    run_decode_benchmark,
)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama")
    model.config.soft_exit_layers = [2, 4]
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "mode", [["--draft_exit", "2"], ["--thresholds", "0.5", "--exit_layers", "2"], ["--num_layers", "2"], []]
)
def test_generate_prints_text_and_stats(saved_model, capsys, mode):
    status = soft_peft_main(
        ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "5", *mode]
    )
    assert status == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert isinstance(json.loads(stats), dict)


@pytest.mark.parametrize("mode", [["--draft_exit", "1"], ["--thresholds", "0.05", "--exit_layers", "1,2"]])
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_generate_with_vocab_texts_prints_the_same_text(saved_model, tmp_path, capsys, mode, suffix):
    texts = tmp_path / f"texts{suffix}"
    rows = [{"instruction": "say hello", "output": "hello there"}, {"output": "lo and behold", "id": 3}]
    lines = [json.dumps(row) for row in rows] if suffix == ".jsonl" else ["hello there", "lo and behold"]
    texts.write_text("\n".join(lines) + "\n")
    base = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "8", *mode]
    assert soft_peft_main(base) == 0
    plain_text = capsys.readouterr().out.rsplit("\n", 2)[0]
    assert soft_peft_main([*base, "--vocab_texts", str(texts), "--vocab_size", "5"]) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text == plain_text
    if "--thresholds" in mode:
        assert json.loads(stats)["full_checks"] <= json.loads(stats)["checks"]


def test_generate_vocab_texts_needs_a_decoder(saved_model, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("abc\n")
    argv = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hi", "--vocab_texts", str(texts)]
    with pytest.raises(SystemExit) as exited:
        soft_peft_main(argv)
    assert exited.value.code == 2 and "--vocab_texts needs --draft_exit or --thresholds" in capsys.readouterr().err


def test_generate_with_a_draft_stop_prints_the_same_text(saved_model, capsys):
    base = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "8"]
    assert soft_peft_main([*base, "--draft_exit", "1"]) == 0
    plain_text = capsys.readouterr().out.rsplit("\n", 2)[0]
    assert soft_peft_main([*base, "--draft_exit", "1", "--draft_stop_threshold", "0.02"]) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text == plain_text and "draft_stops" in json.loads(stats)
    argv = [*base, "--draft_exit", "3", "--draft_stop_threshold", "0.02", "--early_draft_exits", "1,2"]
    assert soft_peft_main(argv) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text == plain_text and sum(json.loads(stats)["drafts_by_exit"].values()) == json.loads(stats)["drafted"]


def test_generate_exit_on_subset(saved_model, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("hello there\nlo and behold\n")
    base = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "8"]
    argv = [*base, "--thresholds", "0.05", "--exit_layers", "1,2", "--vocab_texts", str(texts), "--exit_on_subset"]
    assert soft_peft_main(argv) == 0
    stats = json.loads(capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[1])
    assert stats["full_checks"] == 0 and len(stats["exit_layers"]) == 8
    with pytest.raises(SystemExit) as exited:
        soft_peft_main([*base, "--thresholds", "0.05", "--exit_on_subset"])
    assert exited.value.code == 2 and "--exit_on_subset needs" in capsys.readouterr().err


def test_generate_rejects_a_bad_draft_exit(saved_model, capsys):
    # More bad values, all checked before loading, in tests/cli/test_generate_cli.py
    with pytest.raises(SystemExit) as exited:
        soft_peft_main(["generate", "--model_name_or_path", str(saved_model), "--prompt", "hi", "--draft_exit", "4"])
    assert exited.value.code == 2 and "--draft_exit 4: must be in 1..3" in capsys.readouterr().err


def test_extract_saves_a_reloadable_submodel(saved_model, tmp_path, capsys):
    output = tmp_path / "sub"
    status = soft_peft_main(
        ["extract", "--model_name_or_path", str(saved_model), "--num_layers", "2", "--output_dir", str(output)]
    )
    assert status == 0 and "2-layer" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert reloaded.config.num_hidden_layers == 2


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
