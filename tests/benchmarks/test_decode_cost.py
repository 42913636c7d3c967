"""`python -m benchmarks.decode_cost speed`: the quality study's decoding flags parse as they did, and a run on a tiny
model writes the table and the rows the study reads, its exact decoders agreeing with greedy."""

from __future__ import annotations

import json

from example_runs import gsm8k_rows, save_tiny_model, write_jsonl

from benchmarks import decode_cost, quality_study


def test_the_quality_studys_decoding_flags_parse():
    args = decode_cost.build_parser().parse_args(["speed", *quality_study._decode_flags(30)])
    assert (args.draft_exits, args.dynamic_exits) == ([9, 15, 21], [9, 12, 15, 18, 21, 24, 27])
    assert (args.num_prompts, args.max_new_tokens, args.batch_sizes, args.threads) == (8, 128, [1], 1)
    assert (args.modes, args.thresholds, args.kv_fills) == ("self-speculative,dynamic", [0.9, 0.5], "recompute")
    assert args.draft_stop_thresholds == "0.5" and args.data == "openai/gsm8k"


def test_speed_on_a_tiny_model_writes_the_table_and_the_rows(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(202))  # 200 held out, 2 to count frequent tokens on
    output, rows = tmp_path / "speed.md", tmp_path / "speed.json"
    argv = ["speed", "--model_name_or_path", str(model), "--data", str(data), "--num_prompts", "2"]
    argv += ["--max_new_tokens", "3", "--batch_sizes", "1,2", "--modes", "self-speculative", "--draft_exits", "2"]
    argv += ["--vocab_size", "0", "--draft_stop_thresholds", "none", "--output", str(output), "--json", str(rows)]
    assert decode_cost.main(argv) == 0
    summary = json.loads(rows.read_text())
    assert summary["command"] == "python -m benchmarks.decode_cost " + " ".join(argv)
    assert summary["num_prompts"] == 2 and summary["model"] == str(model)
    assert [(r["batch"], r["mode"]) for r in summary["rows"]] == [
        (1, "greedy"), (1, "self-speculative"), (2, "greedy"), (2, "self-speculative")
    ]  # fmt: skip
    assert all(r["exact_match"] == 1.0 and r["tokens_equal_greedy"] == 1.0 for r in summary["rows"])
    text = output.read_text()
    assert text.startswith(f"Model: `{model}` (4 layers") and "Machine: " in text
    assert "| 1 | self-speculative | draft exit 2, adaptive drafts |" in text
    assert text in capsys.readouterr().out
