"""The plots of the quality study's report: the frontier of the runs at one step count, the learning curves
(each run's held-out full-model CE over steps, and its CE against SFT's at the same step), and each exit's distance
to its run's last layer (KL and agreement, `kl_section`).

`python -m benchmarks.quality_study run --curve_every N` keeps the model every N steps and evaluates each
(`result["curve"]`: ``{step: {exit: metrics}}``); `curve_section` turns the runs that have one into a table and a
plot for the report.
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


def _plot(
    curves: dict[str, dict[int, tuple[float, float]]],
    absolute: dict[str, dict[int, float]],
    last: int,
    mid: int,
    path: Path,
) -> None:
    """Three panels: every run's full-model CE over steps (has each flattened?), then the two ratios to SFT."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13.5, 3.8))
    FigureCanvasAgg(figure)
    colour = {run: f"C{index}" for index, run in enumerate(absolute)}  # one colour per run in every panel
    axes = figure.add_subplot(1, 3, 1)
    for run, losses in absolute.items():
        steps = sorted(losses)
        axes.plot(steps, [losses[s] for s in steps], marker="o", markersize=3, label=run, color=colour[run])
    axes.set(xlabel="optimizer step", ylabel="held-out CE (nats/token)", title=f"full model (exit {last})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    for index, (title, bound) in enumerate(((f"full model (exit {last})", 1.03), (f"exit {mid}", 0.30))):
        axes = figure.add_subplot(1, 3, index + 2)
        for run, ratios in curves.items():
            steps = sorted(ratios)
            axes.plot(steps, [ratios[s][index] for s in steps], marker="o", markersize=3, label=run, color=colour[run])
        axes.axhline(bound, color="black", linestyle=":", linewidth=1, label=f"target {bound:.2f}x")
        axes.set(xlabel="optimizer step", ylabel="held-out CE / SFT's at the same step", title=f"{title}, ×SFT")
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
    absolute = {
        run: {int(step): metrics[str(last)]["loss"] for step, metrics in result["curve"].items()}
        for run, result in group.items()
        if "curve" in result
    }
    lines = [
        f"Over steps: held-out CE / SFT's at the same step (full model exit {last} / exit {mid}), and each run's "
        f"full-model held-out CE (nats per token).",
        "",
        "| run | " + " | ".join(f"step {s}" for s in all_steps) + " |",
        "|---" * (len(all_steps) + 1) + "|",
    ]
    for run, ratios in curves.items():
        cells = [f"{ratios[s][0]:.3f} / {ratios[s][1]:.3f}" if s in ratios else "–" for s in all_steps]
        lines.append(f"| {run}, ×SFT | " + " | ".join(cells) + " |")
    for run, losses in absolute.items():
        cells = [f"{losses[s]:.3f}" if s in losses else "–" for s in all_steps]
        lines.append(f"| {run}, CE | " + " | ".join(cells) + " |")
    plot = results_dir / f"curves_{steps}.png"
    _plot(curves, absolute, last, mid, plot)
    return [*lines, "", f"![held-out CE and ratios to SFT over steps]({os.path.relpath(plot, output.parent)})", ""]


def plot_frontier(
    group: dict[str, dict], summaries: dict[str, dict], path: Path, last_bound: float, mid_bound: float
) -> None:
    """x = last-layer CE / SFT's, y = the middle exit's CE; one labelled point per run, both targets drawn (the
    last layer's ``last_bound`` x SFT's, the middle exit's ``mid_bound`` x SFT's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    mid = next(iter(summaries.values()))["mid"]
    points = {run: (summary["last_ce_vs_sft"], summary["mid_ce"]) for run, summary in summaries.items()}
    for run, (x, y) in points.items():
        style = {"sft": ("s", "tab:red"), "uniform": ("D", "tab:blue")}.get(run, ("o", "tab:gray"))
        axes.scatter(x, y, marker=style[0], color=style[1], zorder=3)
    axes.axvline(last_bound, color="tab:green", linestyle=":", linewidth=1,
                 label=f"target: last layer <= {last_bound:.2f}x SFT")  # fmt: skip
    if "sft" in summaries:
        axes.axhline(mid_bound * summaries["sft"]["mid_ce"], color="tab:purple", linestyle=":", linewidth=1,
                     label=f"target: exit {mid} <= {mid_bound:.2f}x SFT's")  # fmt: skip
    axes.set_xlabel("last-layer held-out CE / SFT's (lower is better)")
    axes.set_ylabel(f"exit {mid} held-out CE (nats)")
    values = [summary["mid_ce"] for summary in summaries.values()]
    if max(values) > 3 * min(values):  # SFT's untrained exits sit far above SoFT's
        axes.set_yscale("log")
    axes.set_title(
        f"SoFT controls at {next(iter(group.values()))['max_steps']} steps: the frontier (targets: lower left)"
    )
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _label_points(figure, axes, points)  # after the layout: labels are placed in display space
    figure.savefig(path, dpi=120)


def _label_points(figure, axes, points: dict[str, tuple[float, float]]) -> None:
    """Label each point beside it: of the places around it (nearest first), the first whose label stays inside the
    axes and covers no other label or point, else the one covering the fewest; the screen's runs crowd together."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = figure.canvas.get_renderer()
    inside = axes.get_window_extent(renderer)
    centres = {run: axes.transData.transform(xy) for run, xy in points.items()}
    markers = {run: Bbox.from_extents(cx - 5, cy - 5, cx + 5, cy + 5) for run, (cx, cy) in centres.items()}
    # Nearest first; a thin line ties each label to its point, which matters where runs crowd together
    sides = [(dx, dy) for dy in (8, -16, 20, -28, 36, -44, 52, -60) for dx in (12, -12, 28, -28, 56, -56)]
    line = {"arrowstyle": "-", "linewidth": 0.7, "color": "0.35", "shrinkA": 1, "shrinkB": 3}

    def label(run, xy, dx, dy):
        return axes.annotate(run, xy, textcoords="offset points", xytext=(dx, dy), ha="left" if dx > 0 else "right",
                             fontsize=8, arrowprops=line)  # fmt: skip

    placed: list = []
    for run, xy in sorted(points.items(), key=lambda item: item[1]):
        others = [box for other, box in markers.items() if other != run] + placed
        best = None
        for side in sides:
            trial = label(run, xy, *side)
            # The text alone (placed first): an annotation's own extent also spans its leader line, which covers its
            # point and its neighbours
            trial.update_positions(renderer)
            box = Text.get_window_extent(trial, renderer)
            trial.remove()
            outside = not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1))
            cost = (outside, sum(box.overlaps(other) for other in others))
            if best is None or cost < best[0]:
                best = (cost, side, box)
            if cost == (False, 0):
                break
        label(run, xy, *best[1])
        placed.append(best[2])


def kl_section(group: dict[str, dict], steps: int, output: Path, results_dir: Path) -> list[str]:
    """Markdown lines (table and log-scale plot) of how far each exit's next-token distribution is from its own run's
    last layer: KL(P_last || P_exit) in nats and top-1 agreement, per exit and run (the paper's claim that SoFT's
    middle exits come close to the last layer). None when no result holds the KL (results older than the harness's
    `kl_to_last`)."""
    runs = {run: result for run, result in group.items() if all("kl_to_last" in v for v in result["exits"].values())}
    if not runs:
        return []
    exits = sorted(int(k) for k in next(iter(runs.values()))["exits"])
    early = exits[:-1]  # the last layer is 0 nats and agreement 1 by definition
    lines = [
        f"Distance to the last layer after {steps} steps: KL(P_last ‖ P_exit) in nats per answer token / top-1 "
        "agreement with the last layer, on the held-out rows (`soft_peft.evaluation.per_exit.evaluate_exits`, the "
        "function `soft-peft eval` reports with).",
        "",
        "| run | " + " | ".join(f"exit {k}" for k in early) + " |",
        "|---" * (len(early) + 1) + "|",
    ]
    for run, result in runs.items():
        cells = [result["exits"][str(k)] for k in early]
        lines.append(
            f"| {run} | " + " | ".join(f"{c['kl_to_last']:.2f} / {c['agreement_with_last']:.2f}" for c in cells) + " |"
        )
    plot = results_dir / f"kl_{steps}.png"
    _plot_kl({run: [r["exits"][str(k)]["kl_to_last"] for k in early] for run, r in runs.items()}, early, plot)
    return [*lines, "", f"![KL to the last layer per exit]({os.path.relpath(plot, output.parent)})", ""]


def _plot_kl(kl: dict[str, list[float]], exits: list[int], path: Path) -> None:
    """One line per run: KL(P_last || P_exit) per exit, log scale (SFT's exits sit 10x above SoFT's), 1 nat marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run, values in kl.items():
        axes.plot(exits, values, marker="o", label=run)
    axes.axhline(1.0, color="0.5", linestyle=":", linewidth=1)
    axes.set_yscale("log")
    axes.set_xticks(exits)
    axes.set_xlabel("exit (layers kept)")
    axes.set_ylabel("KL(last ‖ exit), nats per token")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
