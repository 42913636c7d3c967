"""The learning curves of the quality study: each run's held-out CE against SFT's at the same step, over steps.

`python -m benchmarks.quality_study run --curve_every N` keeps the model every N steps and evaluates each
(`result["curve"]`: ``{step: {exit: metrics}}``); this module turns the runs that have one into a table and a plot
for the report.
"""

from __future__ import annotations

import os
from pathlib import Path


def _mid_exit(exits: list[int]) -> int:
    """The exit nearest half depth (15 of 30), as the report's `summarize` picks it."""
    last = max(exits)
    return min(exits, key=lambda k: (abs(2 * k - last), k))


def curve_ratios(result: dict, sft: dict) -> dict[int, tuple[float, float]]:
    """``{step: (last-layer CE / SFT's, middle exit's CE / SFT's)}`` at the steps both runs evaluated."""
    steps = sorted(set(map(int, result["curve"])) & set(map(int, sft["curve"])))
    exits = sorted(int(k) for k in result["exits"])
    last, mid = max(exits), _mid_exit(exits)
    ratios = {}
    for step in steps:
        mine, theirs = result["curve"][str(step)], sft["curve"][str(step)]
        ratios[step] = tuple(mine[str(k)]["loss"] / theirs[str(k)]["loss"] for k in (last, mid))
    return ratios


def _plot(curves: dict[str, dict[int, tuple[float, float]]], last: int, mid: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.6, 3.8))
    FigureCanvasAgg(figure)
    for index, (title, bound) in enumerate(((f"full model (exit {last})", 1.03), (f"exit {mid}", 0.30))):
        axes = figure.add_subplot(1, 2, index + 1)
        for run, ratios in curves.items():
            steps = sorted(ratios)
            axes.plot(steps, [ratios[s][index] for s in steps], marker="o", markersize=3, label=run)
        axes.axhline(bound, color="tab:green", linestyle=":", linewidth=1, label=f"target {bound:.2f}x")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("held-out CE / SFT's at the same step")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def curve_section(group: dict[str, dict], steps: int, output: Path, results_dir: Path) -> list[str]:
    """Markdown lines (table and plot) for the runs of `group` that have a curve, when SFT has one too; else none."""
    sft = group.get("sft")
    if sft is None or "curve" not in sft:
        return []
    curves = {run: curve_ratios(result, sft) for run, result in group.items() if run != "sft" and "curve" in result}
    if not curves:
        return []
    exits = sorted(int(k) for k in sft["exits"])
    last, mid = max(exits), _mid_exit(exits)
    all_steps = sorted({s for ratios in curves.values() for s in ratios})
    lines = [
        f"Over steps: held-out CE / SFT's at the same step (full model exit {last} / exit {mid}).",
        "",
        "| run | " + " | ".join(f"step {s}" for s in all_steps) + " |",
        "|---" * (len(all_steps) + 1) + "|",
    ]
    for run, ratios in curves.items():
        cells = [f"{ratios[s][0]:.3f} / {ratios[s][1]:.3f}" if s in ratios else "–" for s in all_steps]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    plot = results_dir / f"curves_{steps}.png"
    _plot(curves, last, mid, plot)
    return [*lines, "", f"![ratios to SFT over steps]({os.path.relpath(plot, output.parent)})", ""]
