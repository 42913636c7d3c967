"""The report of `benchmarks.quality_study`: per-run tables against SFT and a frontier plot, from the result JSONs.

python -m benchmarks.quality_study report   # reads docs/study/*.json, writes docs/quality_study.md + plots
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from benchmarks.quality_plots import curve_section, kl_section, plot_frontier

__all__ = ["RESULTS_BLOCK", "current_command", "extract_block", "splice_block", "summarize", "write_report"]

# The study's summary inside docs/results.md: `report` replaces what lies between these markers, and nothing else
RESULTS_BLOCK = ("<!-- quality-study:begin -->", "<!-- quality-study:end -->")

# Targets of issue 13 for the best variant at equal steps, each against SFT's run
TARGETS = {
    "last_ce_vs_sft": ("<=", 1.03),
    "mid_ce_vs_sft": ("<=", 0.30),
    "shallow_agreement": (">=", 0.75),
    "time_vs_sft": ("<=", 1.5),
    "memory_vs_sft": ("<=", 1.05),
}


def _meets(summary: dict, key: str) -> bool:
    """Whether a run's summary meets the target `TARGETS[key]`."""
    op, bound = TARGETS[key]
    return summary[key] <= bound if op == "<=" else summary[key] >= bound


def summarize(result: dict, sft: dict | None) -> dict:
    """One run's headline numbers; ratios against `sft` (``None`` when SFT has no result yet).

    Args:
        result: A run's JSON (see `benchmarks.quality_study`).
        sft: SFT's JSON at the same step count, or ``None``.

    Returns:
        ``{"last", "mid", "shallow", "last_ce", "last_accuracy", "mid_ce", "mean_exit_ce", "shallow_agreement",
        "seconds_per_step", "peak_rss_gb"}`` plus the ``*_vs_sft`` ratios and ``"targets_met"`` when `sft` is given.
        ``mid`` is the exit nearest half depth (15 of 30), ``shallow`` the shallowest (9 of 30).
    """
    exits = {int(k): v for k, v in result["exits"].items()}
    last, shallow = max(exits), min(exits)
    mid = min(exits, key=lambda k: (abs(2 * k - last), k))
    early = [k for k in exits if k != last]
    summary = {
        "last": last,
        "mid": mid,
        "shallow": shallow,
        "last_ce": exits[last]["loss"],
        "last_accuracy": exits[last]["token_accuracy"],
        "mid_ce": exits[mid]["loss"],
        "mean_exit_ce": statistics.fmean(exits[k]["loss"] for k in early) if early else exits[last]["loss"],
        "shallow_agreement": exits[shallow]["agreement_with_last"],
        "seconds_per_step": result["seconds_per_step"],
        "peak_rss_gb": result["peak_rss_gb"],
    }
    if sft is not None:
        sft_exits = {int(k): v for k, v in sft["exits"].items()}
        summary["last_ce_vs_sft"] = summary["last_ce"] / sft_exits[last]["loss"]
        summary["mid_ce_vs_sft"] = summary["mid_ce"] / sft_exits[mid]["loss"]
        summary["time_vs_sft"] = summary["seconds_per_step"] / sft["seconds_per_step"]
        summary["memory_vs_sft"] = summary["peak_rss_gb"] / sft["peak_rss_gb"]
        summary["targets_met"] = sum(_meets(summary, key) for key in TARGETS)
    return summary


def _fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def _headline_table(summaries: dict[str, dict]) -> list[str]:
    """One row per run: the last layer, the middle exit and the shallow exit's agreement against SFT, time, memory.

    The two CE ratios keep 3 decimals: their targets (1.03, 0.30) are tight enough that 2 would hide a miss.
    """
    any_summary = next(iter(summaries.values()))
    mid, shallow = any_summary["mid"], any_summary["shallow"]
    lines = [
        f"| run | last CE | ×SFT | last acc | exit {mid} CE | ×SFT exit {mid} | mean exit CE | exit {shallow} "
        "agree | s/step | ×SFT | peak RSS (GB) | ×SFT | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, s in summaries.items():
        lines.append(
            f"| {run} | {_fmt(s['last_ce'])} | {_fmt(s.get('last_ce_vs_sft'))} | {_fmt(s['last_accuracy'])} | "
            f"{_fmt(s['mid_ce'])} | {_fmt(s.get('mid_ce_vs_sft'))} | {_fmt(s['mean_exit_ce'])} | "
            f"{_fmt(s['shallow_agreement'])} | {_fmt(s['seconds_per_step'], 2)} | {_fmt(s.get('time_vs_sft'), 2)} | "
            f"{_fmt(s['peak_rss_gb'], 2)} | {_fmt(s.get('memory_vs_sft'), 2)} | "
            f"{s['targets_met'] if 'targets_met' in s else '–'}/{len(TARGETS)} |"
        )
    return lines


# What a dynamic-exit cell shows besides its speed: (label, row key, digits)
DYNAMIC_DETAILS = (("depth", "avg_depth", 1), ("= greedy", "tokens_equal_greedy", 2), ("acc", "gsm8k_accuracy", 2))


def _reproduce_commands(by_steps: dict[int, dict[str, dict]], results_dir: Path, tag: str = "") -> list[str]:
    """The study commands that recreate exactly the reported runs and decodings, one line per step count."""
    lines = []
    for steps, group in sorted(by_steps.items()):
        model = next(iter(group.values())).get("model")
        other = f" --tag {tag} --model {model}" if tag and model else ""
        runs = ",".join(group)
        lines.append(f"python -m benchmarks.quality_study run --max_steps {steps} --runs {runs} --core 0{other}")
        decoded = [run for run in group if (results_dir / f"{run}-{steps}.decode.json").exists()]
        if decoded:
            runs = ",".join(decoded)
            lines.append(f"python -m benchmarks.quality_study decode --max_steps {steps} --runs {runs} --core 0")
    return lines


# Decoding commands recorded before the benchmarks became one module per question: the same flags, today's command
RENAMED_COMMANDS = {"python benchmarks/decode_speed.py ": "python -m benchmarks.decode_cost speed "}


def current_command(command: str) -> str:
    """A recorded decoding command as it is run today (older results name the script it replaced)."""
    for old, new in RENAMED_COMMANDS.items():
        if command.startswith(old):
            return new + command[len(old) :]
    return command


def _decode_table(decoded: dict[str, dict]) -> list[str]:
    """One row per decoded run (batch 1): greedy speed and accuracy, the fastest self-speculative setting (exact by
    construction), dynamic exits at the strictest threshold and at the fastest setting, and `assistant_early_exit`
    where measured."""

    def best(rows, mode):
        return max((r for r in rows if r["mode"] == mode), key=lambda r: r["vs_greedy"], default=None)

    def strictest(rows):  # the highest threshold: the dynamic setting closest to greedy
        dynamic = [r for r in rows if r["mode"] == "dynamic"]
        return max(dynamic, key=lambda r: (float(r["setting"].split()[1].rstrip(",")), r["vs_greedy"]), default=None)

    def cell(row, *extra):
        if row is None:
            return "–"
        details = [row["setting"].split(",")[0], *(f"{name} {_fmt(row[key], digits)}" for name, key, digits in extra)]
        return f"{row['vs_greedy']:.2f}× ({'; '.join(details)})"

    # The study decodes with SoFT's own decoders only; older results may also hold transformers' early exit
    assistant = any(r["mode"] == "assistant_early_exit" for summary in decoded.values() for r in summary["rows"])
    header = "| run | greedy tok/s | greedy GSM8K acc | self-speculative, fastest | dynamic, strictest threshold "
    header += "| dynamic, fastest |" + (" assistant_early_exit, fastest |" if assistant else "")
    lines = [header, "|---" * (6 + assistant) + "|"]
    for run, summary in decoded.items():
        rows = [r for r in summary["rows"] if r["batch"] == 1]
        greedy = rows[0]
        line = (
            f"| {run} | {greedy['tokens_per_second']:.1f} | {greedy['gsm8k_accuracy']:.2f} "
            f"| {cell(best(rows, 'self-speculative'), ('acceptance', 'acceptance', 2))} "
            f"| {cell(strictest(rows), *DYNAMIC_DETAILS)} | {cell(best(rows, 'dynamic'), *DYNAMIC_DETAILS)} |"
        )
        lines.append(line + (f" {cell(best(rows, 'assistant_early_exit'))} |" if assistant else ""))
    return lines


def _drafting_table(decoded: dict[str, dict]) -> list[str]:
    """Per run and draft exit (batch 1): acceptance, accepted tokens per verify cycle, the CPU speedup measured and the
    accelerator speedup projected from the same counters (see `decode_harness.projected_speedup`). Results decoded
    before the cycle counters existed show no drafting rows."""
    lines = [
        "| run | draft exit | acceptance | accepted / verify cycle | × greedy, measured (CPU) "
        "| × greedy, projected (accelerator) |",
        "|---|---|---|---|---|---|",
    ]
    for run, summary in decoded.items():
        for row in summary["rows"]:
            if row["batch"] != 1 or row["mode"] != "self-speculative" or row.get("accepted_per_cycle") is None:
                continue
            exit_name = row["setting"].split(",")[0].removeprefix("draft exit ")
            lines.append(
                f"| {run} | {exit_name} | {_fmt(row['acceptance'], 2)} | {_fmt(row['accepted_per_cycle'], 2)} "
                f"| {row['vs_greedy']:.2f} | {_fmt(row['projected_speedup'], 2)} |"
            )
    if len(lines) == 2:
        return []
    return [
        "Drafting per exit. The projection assumes an accelerator at batch 1, where a verify pass costs one forward "
        "whatever the number of drafted tokens and a draft from exit k of L costs k/L of a forward: "
        "(accepted + cycles) / (draft cost + cycles), from the measured counters. It is not a measurement.",
        "",
        *lines,
        "",
    ]


def _decoded(steps: int, group: dict[str, dict], results_dir: Path) -> dict[str, dict]:
    """The decode results (`<run>-<steps>.decode.json`) of the runs of `group` that `quality_study decode` measured."""
    paths = {run: results_dir / f"{run}-{steps}.decode.json" for run in group}
    return {run: json.loads(path.read_text()) for run, path in paths.items() if path.exists()}


def _decode_section(steps: int, group: dict[str, dict], results_dir: Path, output: Path) -> list[str]:
    """The decoding speed of the runs `quality_study decode` has measured at this step count (none: no lines)."""
    decoded = _decoded(steps, group, results_dir)
    if not decoded:
        return []
    any_summary = next(iter(decoded.values()))
    return [
        "Decoding on these checkpoints (`python -m benchmarks.decode_cost speed`, batch 1, "
        f"{any_summary['num_prompts']} held-out prompts, one pinned thread; speed × greedy `generate` of the same "
        "checkpoint in the same process; `= greedy`: share of tokens equal to greedy's, `acc`: GSM8K answer "
        "accuracy). Full tables: "
        + ", ".join(
            f"[{run}]({os.path.relpath(results_dir / f'{run}-{steps}.decode.md', output.parent)})" for run in decoded
        )
        + ".",
        "",
        *_decode_table(decoded),
        "",
        *_drafting_table(decoded),
        "Decoding commands (`quality_study decode` runs them in a pinned child process):",
        "",
        "```bash",
        *(current_command(summary["command"]) for summary in decoded.values()),
        "```",
        "",
    ]


def _group_section(steps: int, group: dict[str, dict], output: Path, results_dir: Path) -> list[str]:
    sft = group.get("sft")
    summaries = {run: summarize(result, sft) for run, result in group.items()}
    lines = [f"## {steps} steps", ""]
    if sft is None:
        lines += ["SFT has no result at this step count yet: no ratios, no plot.", ""]
    last = next(iter(summaries.values()))["last"]
    lines += _headline_table(summaries)
    exits = sorted(int(k) for k in next(iter(group.values()))["exits"])
    lines += [
        "",
        f"Per exit: held-out CE / token accuracy / top-1 agreement with the run's last layer (exit {last}).",
        "",
    ]
    lines += ["| run | " + " | ".join(f"exit {k}" for k in exits) + " |", "|---" * (len(exits) + 1) + "|"]
    for run, result in group.items():
        cells = [result["exits"][str(k)] for k in exits]
        row = " | ".join(
            f"{c['loss']:.2f} / {c['token_accuracy']:.2f} / {c['agreement_with_last']:.2f}" for c in cells
        )
        lines.append(f"| {run} | {row} |")
    if sft is not None:
        plot = results_dir / f"frontier_{steps}.png"
        plot_frontier(group, summaries, plot, TARGETS["last_ce_vs_sft"][1], TARGETS["mid_ce_vs_sft"][1])
        lines += ["", f"![frontier at {steps} steps]({os.path.relpath(plot, output.parent)})"]
    curves = curve_section(group, steps, output, results_dir)
    lines += ["", *curves] if curves else []
    distances = kl_section(group, steps, output, results_dir)
    lines += ["", *distances] if distances else []
    lines += ["", "Training commands (run by the study in a pinned child process):", "", "```bash"]
    lines += [f"{result['command']}" for result in group.values()]
    return [*lines, "```", "", *_decode_section(steps, group, results_dir, output)]


def block_markers(tag: str = "") -> tuple[str, str]:
    """The markers of a study's block in docs/results.md: `RESULTS_BLOCK` for SmolLM2's, one pair per other model's
    `--tag`, so each study's `report` replaces its own block only."""
    return RESULTS_BLOCK if not tag else (f"<!-- quality-study-{tag}:begin -->", f"<!-- quality-study-{tag}:end -->")


def extract_block(text: str, tag: str = "") -> str | None:
    """The study's block of a docs/results.md text (markers included), or ``None``."""
    begin, end = block_markers(tag)
    start, stop = text.find(begin), text.find(end)
    return None if start < 0 or stop < start else text[start : stop + len(end)]


def splice_block(text: str, block: str, tag: str = "") -> str:
    """``text`` with its study block replaced by ``block``; without one, SmolLM2's block goes after the title line
    and another model's (`tag`) at the end."""
    old = extract_block(text, tag)
    if old is not None:
        return text.replace(old, block)
    if tag:
        return f"{text.rstrip()}\n\n{block}\n"
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{block}\n{rest}"


def model_label(result: dict) -> str:
    """The model a result was trained from, for the report's text: its folder's name (results from before the
    harness recorded it are SmolLM2's)."""
    return Path(result["model"]).name if "model" in result else "SmolLM2-135M-Instruct"


def _target_verdicts(summaries: dict[str, dict]) -> list[str]:
    """One line per target: which SoFT runs meet it, or plainly none and how close the nearest run gets."""
    soft = {run: summary for run, summary in summaries.items() if run != "sft"}
    if not soft:
        return []
    any_summary = next(iter(soft.values()))
    names = {
        "last_ce_vs_sft": ("last-layer CE", "x SFT's"),
        "mid_ce_vs_sft": (f"exit {any_summary['mid']} CE", "x SFT's"),
        "shallow_agreement": (f"exit {any_summary['shallow']} agreement with the last layer", ""),
        "time_vs_sft": ("s/step", "x SFT's"),
        "memory_vs_sft": ("peak RSS", "x SFT's"),
    }
    lines = ["Targets for the SoFT runs:", ""]
    for key, (op, bound) in TARGETS.items():
        name, unit = names[key]
        found = _verdict({run: summary[key] for run, summary in soft.items()}, op, bound)
        lines.append(f"- {name} {op} {bound}{unit}: {found}")
    return [*lines, ""]


def _verdict(values: dict[str, float], op: str, bound: float) -> str:
    """The runs whose value meets ``op bound``, or plainly none: the nearest run, its value and its distance."""
    meets = [run for run, value in values.items() if (value <= bound if op == "<=" else value >= bound)]
    if meets:
        return ", ".join(f"{run} ({values[run]:.3f})" for run in meets)
    nearest = (min if op == "<=" else max)(values, key=values.get)
    value = values[nearest]
    return f"**none**; the nearest is {nearest} at {value:.3f}, {abs(value - bound):.3f} from the target"


# Targets of issue 23 for drafting from the shallowest exit (self-speculative decoding, batch 1): the acceptance and
# the accepted tokens per verify cycle, which carry to an accelerator where a verify pass costs about one forward
DRAFT_TARGETS = {"acceptance": 0.85, "accepted_per_cycle": 3.0}


def _draft_verdicts(group: dict[str, dict], decoded: dict[str, dict]) -> list[str]:
    """One line per drafting target for the SoFT runs of `group` decoded with the cycle counters (`decoded`: their
    decode results, from `_decoded`); none when no run was."""
    shallow = min(int(k) for k in next(iter(group.values()))["exits"])
    rows = {}
    for run, summary in decoded.items():
        if run == "sft":
            continue
        for row in summary["rows"]:
            if row["batch"] == 1 and row["mode"] == "self-speculative" and row.get("accepted_per_cycle") is not None:
                if row["setting"].startswith(f"draft exit {shallow},"):
                    rows[run] = row
    if not rows:
        return []
    names = {"acceptance": "draft acceptance", "accepted_per_cycle": "accepted tokens per verify cycle"}
    lines = [f"Drafting targets from exit {shallow} (self-speculative decoding, batch 1):", ""]
    for key, bound in DRAFT_TARGETS.items():
        found = _verdict({run: row[key] for run, row in rows.items()}, ">=", bound)
        lines.append(f"- exit {shallow} {names[key]} >= {bound}: {found}")
    return [*lines, ""]


def _results_block(
    by_steps: dict[int, dict[str, dict]], results_md: Path, output: Path, results_dir: Path, tag: str = ""
) -> str:
    """The summary for docs/results.md: for every step count where SFT and a SoFT run have both run, largest first
    (the final runs, then the screen), the headline table and its frontier plot; for the final runs also their
    curves over steps and their drafting table, when they have them."""
    begin, end = block_markers(tag)
    label = model_label(next(iter(next(iter(by_steps.values())).values())))
    title = "## Quality study: the SoFT controls against SFT at equal budget" + (f" ({label})" if tag else "")
    lines = [begin, "", title, ""]
    with_sft = [steps for steps, group in by_steps.items() if "sft" in group]
    if not with_sft:
        return "\n".join([*lines, "No SFT result yet.", "", end])
    # SFT alone compares nothing: its step count is shown only until a SoFT run has finished beside SFT
    compared = sorted((s for s in with_sft if len(by_steps[s]) > 1), reverse=True) or [max(with_sft)]
    report = os.path.relpath(output, results_md.parent)
    lines += [
        f"{label} on GSM8K, held-out answer CE against SFT's at equal steps. Per-exit tables, decoding "
        f"speed, every step count and the exact commands: [{output.name}]({report}) (written with this block by "
        "`python -m benchmarks.quality_study report`).",
        "",
    ]
    for steps in compared:
        group = by_steps[steps]
        summaries = {run: summarize(result, group["sft"]) for run, result in group.items()}
        plot = Path(os.path.relpath(results_dir / f"frontier_{steps}.png", results_md.parent))
        heading = f"### {steps} steps"
        if len(compared) > 1 and steps in (compared[0], compared[-1]):  # a middle budget has no role to name
            heading += " (final runs)" if steps == compared[0] else " (screen)"
        lines += [heading, "", f"{len(group)} runs of {steps} steps each.", "", *_headline_table(summaries), ""]
        lines += _target_verdicts(summaries)
        decoded = _decoded(steps, group, results_dir)
        lines += _draft_verdicts(group, decoded)
        lines += [f"![frontier at {steps} steps]({plot})", ""]
        if steps == compared[0]:  # the final runs: how they got there, and what their drafts are worth
            lines += curve_section(group, steps, results_md, results_dir)
            lines += kl_section(group, steps, results_md, results_dir)
            lines += _drafting_table(decoded)
    return "\n".join([*lines, end])


def write_report(results_dir: Path, output: Path, repo: Path, results_md: Path | None = None, tag: str = "") -> None:
    """Write the study's markdown report (and one frontier plot per step count) from `results_dir/*.json`.

    Args:
        results_dir: Folder of the per-run JSON files.
        output: The markdown file to write.
        repo: Repository root (for the commands shown).
        results_md: Also put the headline table in this file (docs/results.md), between `block_markers(tag)`.
        tag: The study's `--tag` (a model other than SmolLM2): its own block and reproduce commands.

    Raises:
        SystemExit: when there is no result to report.
    """
    # `<run>-<steps>.decode.json` files hold decoding rows, not runs
    paths = [p for p in sorted(Path(results_dir).glob("*.json")) if not p.name.endswith(".decode.json")]
    results = [json.loads(p.read_text()) for p in paths]
    if not results:
        raise SystemExit(f"no results in {results_dir}: run `python -m benchmarks.quality_study run` first.")
    by_steps: dict[int, dict[str, dict]] = {}
    for result in sorted(results, key=lambda r: (r["run"] != "sft", r["run"] != "uniform", r["run"])):
        by_steps.setdefault(result["max_steps"], {})[result["run"]] = result
    first = results[0]
    label, headline = model_label(first), summarize(first, None)
    depth, mid, shallow = headline["last"], headline["mid"], headline["shallow"]
    folder = os.path.relpath(results_dir, repo) if Path(results_dir).is_relative_to(repo) else results_dir
    tagged = f" --tag {tag}" if tag else ""
    lines = [
        "# Quality study: SoFT controls against SFT at equal budget" + (f" ({label})" if tag else ""),
        "",
        f"Generated by `python -m benchmarks.quality_study report{tagged}` from `{folder}/*.json`. {label} on "
        "GSM8K train, `recipes/smollm2_135m_gsm8k_soft.yaml` for every run (batch 4, max_length 256, lr 1e-4 "
        f"cosine, seed 0, the same data order); SFT = the same recipe with `--exit_layers {depth}`. Held-out metrics: "
        "the "
        f"first {first['eval_rows']} rows of the fixed split `held_out_split(rows, test_size=200, seed=0)` "
        f"({first['eval_tokens']} answer tokens), teacher-forced, every exit through the model's own norm and head.",
        "",
        f"Targets (issue 13, best variant vs SFT): last-layer CE <= 1.03x; exit-{mid} CE <= 0.30x SFT's exit {mid}; "
        f"exit-{shallow} agreement with the last layer >= 0.75; time <= 1.5x; memory <= 1.05x. Time is the median "
        "training step of one pinned single-thread process (start-up excluded); memory the training process's peak "
        "RSS. The CPU is shared: compare times within one table.",
        "",
        "Reproduce every run below (one process per core: split a `--runs` list over `--core 0` and `--core 1`; "
        "finished runs are skipped, interrupted ones resume):",
        "",
        "```bash",
        *_reproduce_commands(by_steps, Path(results_dir), tag),
        f"python -m benchmarks.quality_study report{tagged}",
        "```",
        "",
    ]
    for steps in sorted(by_steps):
        lines += _group_section(steps, by_steps[steps], Path(output), Path(results_dir))
    Path(output).write_text("\n".join(lines))
    print(f"[study] report written to {output}")
    if results_md is not None:
        block = _results_block(by_steps, Path(results_md), Path(output), Path(results_dir), tag)
        existing = Path(results_md).read_text() if Path(results_md).exists() else "# Results\n"
        Path(results_md).write_text(splice_block(existing, block, tag))
        print(f"[study] summary written to {results_md}")
