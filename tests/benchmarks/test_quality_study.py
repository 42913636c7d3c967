"""`python -m benchmarks.quality_study` on a tiny random model and a handful of rows: an interrupted run resumes from
its checkpoint, a finished run is skipped, and the report (tables and frontier plot) is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from example_runs import ROOT, gsm8k_rows, run, save_tiny_model, write_jsonl

from benchmarks.quality_report import current_command, summarize, write_report

STUDY = ["python", "-m", "benchmarks.quality_study"]


def study(tmp_path: Path, *extra: str, check: bool = False, command: str = "run"):
    tiny = [
        "--model", str(tmp_path / "model"), "--data", str(tmp_path / "rows.jsonl"), "--held_out", "4",
        "--eval_rows", "4", "--max_steps", "2", "--save_steps", "1", "--batch_size", "2", "--max_length", "64",
        "--cache_dir", str(tmp_path / "cache"), "--results_dir", str(tmp_path / "results"), "--core", "-1",
    ]  # fmt: skip
    return run([*STUDY, command, *tiny, *extra], check=check)


def test_interrupted_run_resumes_finished_run_is_skipped_and_report_is_written(tmp_path):
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(20))
    run_dir, result = tmp_path / "cache" / "sft-2", tmp_path / "results" / "sft-2.json"

    os.environ["SOFT_PEFT_STUDY_STOP_AFTER_SAVE"] = "1"  # the child dies right after checkpoint-1
    try:
        interrupted = study(tmp_path, "--runs", "sft")
    finally:
        del os.environ["SOFT_PEFT_STUDY_STOP_AFTER_SAVE"]
    assert interrupted.returncode == 1 and "training failed" in interrupted.stderr
    assert (run_dir / "checkpoint-1").is_dir() and not result.exists()

    resumed = study(tmp_path, "--runs", "sft", check=True)
    assert "resuming from checkpoint-1" in resumed.stdout
    segments = [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert [s["resumed_from"] for s in segments] == [None, "checkpoint-1"]
    steps = [json.loads(line) for line in (run_dir / "step_times.jsonl").read_text().splitlines()]
    assert [(s["step"], s["first_in_process"]) for s in steps] == [(1, True), (2, True)]  # one step per process
    saved = json.loads(result.read_text())
    assert saved["flags"] == ["--exit_layers", "4"] and saved["max_steps"] == 2
    assert sorted(saved["exits"]) == ["1", "2", "3", "4"] and saved["exits"]["4"]["agreement_with_last"] == 1.0
    assert saved["seconds_per_step"] > 0 and saved["peak_rss_gb"] > 0.1

    skipped = study(tmp_path, "--runs", "sft", check=True)
    assert "finished, skipped" in skipped.stdout and "training" not in skipped.stdout

    report = tmp_path / "report.md"
    results_md = tmp_path / "results.md"
    results_md.write_text("# Results\nThe replication.\n")
    write_report(tmp_path / "results", report, ROOT, results_md=results_md)
    summary = results_md.read_text()
    assert "| sft | " in summary and "frontier_2.png" in summary and summary.endswith("The replication.\n")
    text = report.read_text()
    assert (
        "| sft | " in text and "--exit_layers 4" in text and (tmp_path / "results" / "frontier_2.png").stat().st_size
    )
    assert summarize(saved, saved)["last_ce_vs_sft"] == 1.0
    assert "benchmarks.quality_study run --max_steps 2 --runs sft --core 0" in text
    assert "benchmarks.quality_study decode" not in text


def test_dry_run_prints_each_runs_command_with_its_flags_last(tmp_path):
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(8))
    printed = study(tmp_path, "--dry-run", "--variant", "mine=--exit_loss_weights last:0.5", check=True).stdout
    lines = {
        line.split(":")[0]: line for line in printed.splitlines() if line.startswith(("sft:", "ramp_all:", "mine:"))
    }
    assert lines["sft"].endswith("--exit_layers 4") and "--exit_layers 1,2,3,4" not in lines["sft"]
    assert lines["ramp_all"].endswith("--exit_layers 1,2,3,4 --exit_ramp_steps 1 --exit_ramp_order all")
    assert lines["mine"].endswith("--exit_loss_weights last:0.5")
    assert not (tmp_path / "cache").exists()


def test_summary_ratios_against_sft():
    def result(last, mid, seconds, rss):
        exits = {"9": {"loss": 4.0, "token_accuracy": 0.5, "agreement_with_last": 0.8, "kl_to_last": 1.0}}
        exits["15"] = {"loss": mid, "token_accuracy": 0.6, "agreement_with_last": 0.9, "kl_to_last": 0.5}
        exits["30"] = {"loss": last, "token_accuracy": 0.8, "agreement_with_last": 1.0, "kl_to_last": 0.0}
        return {"exits": exits, "seconds_per_step": seconds, "peak_rss_gb": rss}

    sft, soft = result(0.75, 16.0, 10.0, 4.0), result(0.78, 4.0, 14.0, 4.1)
    summary = summarize(soft, sft)
    assert (summary["mid"], summary["shallow"], summary["last"]) == (15, 9, 30)
    assert summary["last_ce_vs_sft"] == 0.78 / 0.75 and summary["mid_ce_vs_sft"] == 0.25
    assert summary["mean_exit_ce"] == 4.0 and summary["shallow_agreement"] == 0.8
    assert summary["time_vs_sft"] == 1.4 and summary["memory_vs_sft"] == 4.1 / 4.0
    assert summary["targets_met"] == 4  # all but the last layer (1.04x > 1.03x)


def test_results_md_gets_one_summary_block_that_survives_both_reports():
    from benchmarks.quality_report import RESULTS_BLOCK, extract_block, splice_block

    begin, end = RESULTS_BLOCK
    replication = "# Results\nReplication text.\n"
    first = splice_block(replication, f"{begin}\nstudy v1\n{end}")
    assert first == f"# Results\n\n{begin}\nstudy v1\n{end}\nReplication text.\n"
    second = splice_block(first, f"{begin}\nstudy v2\n{end}")  # the study's report again: replaced, not stacked
    assert second.count(begin) == 1 and "study v2" in second and "study v1" not in second
    # A rewritten file keeps the block it is given
    regenerated = splice_block("# Results\nNew replication.\n", extract_block(second))
    assert "study v2" in regenerated and "New replication." in regenerated
    assert extract_block("no block here") is None


def _finished_run(tmp_path: Path, name: str, flags: list[str]) -> None:
    """A run as `run` leaves it, without training: the checkpoint in the cache and a result JSON."""
    save_tiny_model(tmp_path / "cache" / f"{name}-2")
    exits = {
        str(k): {"loss": 1.0, "token_accuracy": 0.5, "agreement_with_last": 0.5, "kl_to_last": 0.1}
        for k in range(1, 5)
    }
    result = {"run": name, "flags": flags, "max_steps": 2, "command": "python examples/gsm8k.py", "exits": exits}
    result |= {"seconds_per_step": 1.0, "peak_rss_gb": 1.0, "eval_rows": 4, "eval_tokens": 40}
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / f"{name}-2.json").write_text(json.dumps(result))


def test_decode_measures_finished_runs_with_the_same_exits_and_the_report_shows_it(tmp_path):
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(210))  # the decoding benchmark holds out 200 rows
    decode = ["--decode_flags", "--num_prompts 2 --max_new_tokens 4 --vocab_size 0 --draft_stop_thresholds none"]

    early = study(tmp_path, "--runs", "uniform", *decode, command="decode")
    assert early.returncode == 0 and "uniform-2: not trained yet" in early.stdout

    _finished_run(tmp_path, "sft", ["--exit_layers", "4"])
    _finished_run(tmp_path, "uniform", [])
    first = study(tmp_path, "--runs", "sft,uniform", *decode, check=True, command="decode")
    assert "sft-2: decoded" in first.stdout and "uniform-2: decoded" in first.stdout
    for run_name in ("sft", "uniform"):
        decoded = json.loads((tmp_path / "results" / f"{run_name}-2.decode.json").read_text())
        # Every checkpoint decodes with the SoFT runs' early exits, whatever it recorded
        assert decoded["command"].startswith("python -m benchmarks.decode_cost speed --model_name_or_path ")
        assert "--draft_exits 1,3 --dynamic_exits 1,2,3" in decoded["command"]
        assert str(Path.home()) not in decoded["command"]
        assert decoded["num_prompts"] == 2 and decoded["rows"][0]["mode"] == "greedy"
        speculative = [r for r in decoded["rows"] if r["mode"] == "self-speculative"]
        assert [r["setting"].split(",")[0] for r in speculative] == ["draft exit 1", "draft exit 3"]
        assert all(r["exact_match"] == 1.0 and 0 <= r["acceptance"] <= 1 for r in speculative)  # exact decoding
    again = study(tmp_path, "--runs", "sft", *decode, check=True, command="decode")
    assert "sft-2: decoded, skipped" in again.stdout

    report, results_md = tmp_path / "report.md", tmp_path / "results.md"
    write_report(tmp_path / "results", report, ROOT, results_md)
    text = report.read_text()
    # docs/results.md shows the final runs' drafting table (the full decode tables stay in the report)
    summary = results_md.read_text()
    assert "× greedy, projected (accelerator)" in summary and "| uniform | 1 |" in summary
    assert "| run | greedy tok/s |" not in summary
    assert "| run | greedy tok/s |" in text and "[uniform](results/uniform-2.decode.md)" in text
    row = next(line for line in text.splitlines() if line.startswith("| uniform | ") and "draft exit" in line)
    assert "acceptance" in row and "threshold" in row and row.count("|") == 7  # no assistant_early_exit column
    # Per draft exit: acceptance, accepted tokens per verify cycle and the labelled accelerator projection
    assert "× greedy, projected (accelerator)" in text and "It is not a measurement." in text
    drafting = [
        line for line in text.splitlines() if line.startswith("| uniform | 1 |") or line.startswith("| uniform | 3 |")
    ]
    assert len(drafting) == 2 and all(line.count("|") == 7 for line in drafting)
    assert text.count("## 2 steps") == 1  # decode files are not read as runs
    # The reproduce block names exactly the runs and decodings reported
    assert "benchmarks.quality_study run --max_steps 2 --runs sft,uniform --core 0\n" in text
    assert "benchmarks.quality_study decode --max_steps 2 --runs sft,uniform --core 0\n" in text


def test_results_md_summarizes_every_step_count_where_sft_has_company_largest_first(tmp_path):
    from benchmarks.quality_report import _results_block

    def group(*runs):
        return {run: {"run": run, "max_steps": 0, "exits": {"1": {"loss": 1.0, "agreement_with_last": 1.0,
                "token_accuracy": 1.0}}, "seconds_per_step": 1.0, "peak_rss_gb": 1.0} for run in runs}  # fmt: skip

    def block(by_steps):
        return _results_block(by_steps, tmp_path / "results.md", tmp_path / "report.md", tmp_path)

    assert "No SFT result yet" in block({400: group("uniform")})
    assert "### 400 steps\n" in block({100: group("sft"), 400: group("sft")})  # SFT alone: its latest
    by_steps = {100: group("sft", "uniform", "last_75"), 400: group("sft")}
    text = block(by_steps)
    assert "### 100 steps\n" in text and "3 runs of 100 steps" in text and "frontier_100.png" in text
    assert "400 steps" not in text  # SFT alone at 400 compares nothing yet
    by_steps[400] = group("sft", "last_75")
    text = block(by_steps)
    final, screen = text.index("### 400 steps (final runs)"), text.index("### 100 steps (screen)")
    assert final < screen and "frontier_400.png" in text[final:screen] and "frontier_100.png" in text[screen:]
    assert text[final:screen].count("| last_75 |") == 1 and "| uniform |" not in text[final:screen]
    by_steps[1819] = group("sft", "last_75")  # a third budget: the largest is final, the smallest the screen
    text = block(by_steps)
    final, middle = text.index("### 1819 steps (final runs)"), text.index("### 400 steps\n")
    assert final < middle < text.index("### 100 steps (screen)")


def test_results_md_says_plainly_which_runs_meet_each_target_and_how_close_the_nearest_gets(tmp_path):
    from benchmarks.quality_report import _results_block

    def result(run, last, mid, agree, seconds, rss):
        exits = {"9": {"loss": mid, "agreement_with_last": agree, "token_accuracy": 0.5},
                 "15": {"loss": mid, "agreement_with_last": agree, "token_accuracy": 0.5},
                 "30": {"loss": last, "agreement_with_last": 1.0, "token_accuracy": 0.8}}  # fmt: skip
        return {"run": run, "max_steps": 4, "exits": exits, "seconds_per_step": seconds, "peak_rss_gb": rss}

    group = {
        "sft": result("sft", 1.0, 10.0, 0.1, 10.0, 3.0),
        "a": result("a", 1.02, 2.0, 0.5, 20.0, 3.0),  # meets the last layer (1.02x), exit 15 (0.2x), memory
        "b": result("b", 1.10, 4.0, 0.6, 12.0, 3.3),  # meets only the time target (1.2x)
    }
    text = _results_block({4: group}, tmp_path / "results.md", tmp_path / "report.md", tmp_path)
    lines = {line.split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert lines["- last-layer CE <= 1.03x SFT's"].endswith(": a (1.020)")
    assert lines["- exit 15 CE <= 0.3x SFT's"].endswith(": a (0.200)")
    assert lines["- exit 9 agreement with the last layer >= 0.75"].endswith(
        "**none**; the nearest is b at 0.600, 0.150 from the target"
    )
    assert lines["- s/step <= 1.5x SFT's"].endswith(": b (1.200)")
    assert lines["- peak RSS <= 1.05x SFT's"].endswith(": a (1.000)")
    assert "Drafting targets" not in text  # nothing decoded with the cycle counters

    def decoded(run, acceptance, per_cycle):
        rows = [{"batch": 1, "mode": "greedy", "setting": "generate(do_sample=False)"}]
        for exit_layer, scale in ((9, 1.0), (15, 2.0)):  # exit 15's better numbers must not count for exit 9
            rows.append({"batch": 1, "mode": "self-speculative", "setting": f"draft exit {exit_layer}, adaptive",
                         "acceptance": acceptance * scale, "accepted_per_cycle": per_cycle * scale,
                         "vs_greedy": 0.9, "projected_speedup": 1.5})  # fmt: skip
        (tmp_path / f"{run}-4.decode.json").write_text(json.dumps({"rows": rows}))

    decoded("sft", 0.99, 9.0)  # SFT's drafts are no SoFT result
    decoded("a", 0.80, 3.5)
    decoded("b", 0.84, 2.0)
    text = _results_block({4: group}, tmp_path / "results.md", tmp_path / "report.md", tmp_path)
    lines = {line.split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert lines["- exit 9 draft acceptance >= 0.85"].endswith(
        "**none**; the nearest is b at 0.840, 0.010 from the target"
    )
    assert lines["- exit 9 accepted tokens per verify cycle >= 3.0"].endswith(": a (3.500)")


def test_curve_every_keeps_and_evaluates_snapshots_across_an_interruption_and_the_report_draws_them(tmp_path):
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(20))
    bad = study(tmp_path, "--runs", "sft", "--curve_every", "3", "--save_steps", "2")
    assert bad.returncode == 2 and "must be 0 or a multiple of --save_steps 2" in bad.stderr

    os.environ["SOFT_PEFT_STUDY_STOP_AFTER_SAVE"] = "1"  # killed right after checkpoint-1 and its snapshot
    try:
        assert study(tmp_path, "--runs", "sft", "--curve_every", "1").returncode == 1
    finally:
        del os.environ["SOFT_PEFT_STUDY_STOP_AFTER_SAVE"]
    assert (tmp_path / "cache" / "sft-2" / "curve" / "step-1" / "model.safetensors").exists()
    study(tmp_path, "--runs", "sft,uniform", "--curve_every", "1", check=True)
    results = {run: json.loads((tmp_path / "results" / f"{run}-2.json").read_text()) for run in ("sft", "uniform")}
    for result in results.values():
        assert sorted(result["curve"]) == ["1", "2"] and result["curve"]["2"] == result["exits"]
        assert result["curve"]["1"] != result["curve"]["2"]  # another model: trained one step less

    report, results_md = tmp_path / "report.md", tmp_path / "results.md"
    write_report(tmp_path / "results", report, ROOT, results_md)
    text = report.read_text()
    # docs/results.md shows the final runs' curves too, its plot linked from where it lies
    summary = results_md.read_text()
    assert "| run | step 1 | step 2 |" in summary and "](results/curves_2.png)" in summary
    table = text.splitlines()
    header = table.index("| run | step 1 | step 2 |")  # the curve table
    row = next(line for line in table[header:] if line.startswith("| uniform, ×SFT | "))
    sft, uniform = results["sft"]["curve"], results["uniform"]["curve"]
    expected = uniform["1"]["4"]["loss"] / sft["1"]["4"]["loss"]
    assert f"{expected:.3f} / " in row
    sft_row = next(line for line in table[header:] if line.startswith("| sft, CE | "))
    assert sft_row.split(" | ")[1:] == [f"{sft['1']['4']['loss']:.3f}", f"{sft['2']['4']['loss']:.3f} |"]
    assert (tmp_path / "results" / "curves_2.png").stat().st_size


def test_recorded_decoding_commands_are_shown_as_todays_command():
    old = "python benchmarks/decode_speed.py --model_name_or_path ~/x --num_prompts 8"
    assert current_command(old) == "python -m benchmarks.decode_cost speed --model_name_or_path ~/x --num_prompts 8"
    assert (
        current_command("python -m benchmarks.decode_cost speed --x 1")
        == "python -m benchmarks.decode_cost speed --x 1"
    )


def test_variants_are_parsed_and_refused_as_the_command_line_says(tmp_path):
    save_tiny_model(tmp_path / "model")
    listed = study(tmp_path, "--variant", "mine=--exit_rotation 3", command="list", check=True).stdout
    assert "mine             --exit_rotation 3" in listed and listed.startswith("sft ")
    refused = study(tmp_path, "--variant", "mine", command="list")
    assert refused.returncode == 2 and 'expected NAME="--flag value ..."' in refused.stderr


def test_decode_results_name_no_path_of_this_machine(tmp_path):
    """The decode files are committed: the checkout, the home folder and a local GSM8K copy must not appear in them
    (the copy is named by its Hub id, which gives the same prompts)."""
    from benchmarks.quality_study import make_decode_portable

    data = tmp_path / "gsm8k" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    checkout = tmp_path / "checkout"
    model = f"{Path.home()}/.cache/soft_peft/study/sft-1819"
    command = (
        f"python -m benchmarks.decode_cost speed --model_name_or_path {model} --data {data} "
        f"--output {checkout}/docs/study/sft-1819.decode.md"
    )
    decoded = tmp_path / "sft-1819.decode.json"
    decoded.write_text(json.dumps({"model": model, "command": command, "rows": [{"tokens_per_second": 17.5}]}))
    decoded.with_suffix(".md").write_text(f"Model: `{model}`.\nCommand: `{command}`\n| 1 | greedy | 17.5 |\n")

    make_decode_portable(decoded, str(data), repo=checkout)

    summary = json.loads(decoded.read_text())
    expected = (
        "python -m benchmarks.decode_cost speed --model_name_or_path ~/.cache/soft_peft/study/sft-1819 "
        "--data openai/gsm8k --output docs/study/sft-1819.decode.md"
    )
    assert summary == {
        "model": "~/.cache/soft_peft/study/sft-1819",
        "command": expected,
        "rows": [{"tokens_per_second": 17.5}],
    }
    assert decoded.with_suffix(".md").read_text() == (
        f"Model: `~/.cache/soft_peft/study/sft-1819`.\nCommand: `{expected}`\n| 1 | greedy | 17.5 |\n"
    )


def test_a_fork_trains_exactly_as_the_run_from_scratch_and_records_it(tmp_path):
    """`--fork_from SOURCE@STEP` starts a run whose anneal has not begun from another run's kept checkpoint: its
    result equals the same run trained from step 0, and it records the fork."""
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(20))
    base = "--exit_layers 2,4 --exit_loss_weights last:0.75"
    variants = [
        *("--variant", f"trunk={base}", "--variant", f"tail={base} --exit_anneal_fraction 0.5"),
        *("--variant", f"scratch={base} --exit_anneal_fraction 0.5", "--max_steps", "4", "--curve_every", "2"),
    ]
    study(tmp_path, "--runs", "trunk", "--keep_steps", "2", *variants, check=True)
    kept = tmp_path / "cache" / "trunk-4" / "kept" / "checkpoint-2"
    assert (kept / "optimizer.pt").exists() and not (tmp_path / "cache" / "trunk-4" / "checkpoint-2").exists()

    late = study(tmp_path, "--runs", "tail", "--fork_from", "trunk@3", *variants)
    assert late.returncode == 1 and "anneal over the final 0.5 of 4 steps starts at step 2, before 3" in late.stderr
    two = study(tmp_path, "--runs", "tail,scratch", "--fork_from", "trunk@2", *variants)
    assert two.returncode == 2 and "a single name in --runs" in two.stderr

    forked = study(tmp_path, "--runs", "tail", "--fork_from", "trunk@2", *variants, check=True)
    assert "forked from trunk-4 at step 2" in forked.stdout and "resuming from checkpoint-2" in forked.stdout
    study(tmp_path, "--runs", "scratch", *variants, check=True)
    tail, scratch, trunk = (
        json.loads((tmp_path / "results" / f"{r}-4.json").read_text()) for r in ("tail", "scratch", "trunk")
    )
    assert tail["forked_from"] == {"run": "trunk", "step": 2} and "forked_from" not in scratch
    assert tail["exits"] == scratch["exits"] and tail["curve"] == scratch["curve"]  # the same numbers, exactly
    assert tail["curve"]["2"] == trunk["curve"]["2"] and tail["exits"] != trunk["exits"]  # the anneal changed 3, 4
    assert tail["final_train_loss"] == scratch["final_train_loss"]


def test_fork_refusal_allows_only_runs_that_train_identically_up_to_the_fork():
    from benchmarks.quality_study import fork_refusal

    base = ["--exit_loss_weights", "last:0.75", "--exit_rotation", "2"]
    half, tenth = [*base, "--exit_anneal_fraction", "0.5"], [*base, "--exit_anneal_fraction=0.1"]
    assert fork_refusal(base, half, 200, 400) is None  # the anneal's first step is step 200 (the 201st)
    assert fork_refusal(half, tenth, 200, 400) is None and fork_refusal(base, tenth, 360, 400) is None
    assert "starts at step 200, before 201" in fork_refusal(base, half, 201, 400)
    assert "starts at step 360, before 361" in fork_refusal(tenth, base, 361, 400)  # either side's anneal counts
    assert "differ from the source's" in fork_refusal(base, [*base, "--layer_dropout", "0.1"], 100, 400)
    assert "differ from the source's" in fork_refusal(base, ["--exit_loss_weights", "last:0.85"], 100, 400)
    floor = [*half, "--exit_anneal_floor", "0.2"]
    assert fork_refusal(half, floor, 200, 400) is None  # a floor changes nothing before the anneal


def test_kl_section_shows_each_early_exits_kl_and_agreement_per_run_and_draws_them(tmp_path):
    from benchmarks.quality_plots import kl_section

    def result(kl: list[float], with_kl: bool = True) -> dict:
        exits = {}
        for k, value in zip((2, 4, 6), [*kl, 0.0], strict=True):
            metrics = {"loss": 1.0, "token_accuracy": 0.5, "agreement_with_last": 1.0 / (1.0 + value)}
            exits[str(k)] = {**metrics, "kl_to_last": value} if with_kl else metrics
        return {"exits": exits}

    group = {"sft": result([12.5, 3.25]), "soft": result([1.5, 0.125]), "old": result([1.0, 1.0], with_kl=False)}
    lines = kl_section(group, 7, tmp_path / "report.md", tmp_path)
    assert "| run | exit 2 | exit 4 |" in lines  # the last layer (0 nats, agreement 1) is left out
    assert "| sft | 12.50 / 0.07 | 3.25 / 0.24 |" in lines and "| soft | 1.50 / 0.40 | 0.12 / 0.89 |" in lines
    assert not any(line.startswith("| old |") for line in lines)  # a result without the KL is not shown as 0
    assert "![KL to the last layer per exit](kl_7.png)" in lines and (tmp_path / "kl_7.png").stat().st_size
    assert kl_section({"old": result([1.0, 1.0], with_kl=False)}, 7, tmp_path / "report.md", tmp_path) == []


def test_a_tagged_study_of_another_model_keeps_its_own_folders_report_and_results_block(tmp_path):
    """`--tag gemma3`: runs `gemma3-<run>-<steps>` in the cache, results in `<results>/gemma3/`, its own report and
    its own block of docs/results.md, after SmolLM2's, which it leaves as it is."""
    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(8))
    tagged = ["--tag", "gemma3", "--results_dir", str(tmp_path / "results" / "gemma3")]
    printed = study(tmp_path, "--dry-run", "--runs", "sft", *tagged, check=True).stdout
    assert str(tmp_path / "cache" / "gemma3-sft-2") in printed
    refused = study(tmp_path, "--dry-run", "--tag", "Gemma 3")
    assert refused.returncode == 2 and "a tag is lower-case letters, digits and _" in refused.stderr

    from benchmarks.quality_report import RESULTS_BLOCK, block_markers

    def result(run: str, last: float, model: str) -> dict:
        exits = {str(k): {"loss": last * (5 - k), "token_accuracy": 0.5, "agreement_with_last": 0.5,
                 "kl_to_last": 0.1 * (4 - k)} for k in (2, 3, 4)}  # fmt: skip
        return {"run": run, "model": model, "tag": "gemma3", "flags": [], "max_steps": 2, "exits": exits,
                "command": "python examples/gsm8k.py", "seconds_per_step": 1.0, "peak_rss_gb": 1.0,
                "eval_rows": 4, "eval_tokens": 40}  # fmt: skip

    folder = tmp_path / "results" / "gemma3"
    folder.mkdir(parents=True)
    for name, last in (("sft", 1.0), ("last_75_rotate2", 1.1)):
        (folder / f"gemma3-{name}-2.json").write_text(json.dumps(result(name, last, "~/.cache/soft_peft/gemma3-270m")))
    results_md = tmp_path / "results.md"
    begin, end = RESULTS_BLOCK
    results_md.write_text(f"# Results\n\n{begin}\nSmolLM2's study\n{end}\nThe replication.\n")
    report = tmp_path / "quality_study_gemma3.md"
    write_report(folder, report, ROOT, results_md=results_md, tag="gemma3")
    text, summary = report.read_text(), results_md.read_text()
    assert text.startswith("# Quality study: SoFT controls against SFT at equal budget (gemma3-270m)")
    assert "gemma3-270m on GSM8K train" in text and "`--exit_layers 4`" in text and "exit-2 CE <= 0.30x" in text
    assert "--runs sft,last_75_rotate2 --core 0 --tag gemma3 --model ~/.cache/soft_peft/gemma3-270m" in text
    assert "quality_study report --tag gemma3" in text
    gemma_begin, gemma_end = block_markers("gemma3")
    assert summary.startswith(f"# Results\n\n{begin}\nSmolLM2's study\n{end}\nThe replication.\n\n{gemma_begin}")
    assert summary.rstrip().endswith(gemma_end) and "| last_75_rotate2 | 1.100 | 1.100 |" in summary
    write_report(folder, report, ROOT, results_md=results_md, tag="gemma3")  # again: replaced, not stacked
    assert results_md.read_text() == summary
