"""Outputs of an evaluation run: ``metrics.json``, ``report.md`` with tables, and PNG plots (matplotlib Agg canvas)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .per_exit import ExitEvaluation

__all__ = ["plot_exit_curves", "plot_similarity", "require_matplotlib", "short_name", "write_outputs"]

_CURVES = (
    ("loss", "loss on the evaluated rows (nats)"),
    ("token_accuracy", "completion token accuracy"),
    ("kl_to_last", "KL(last || exit) (nats)"),
    ("agreement_with_last", "top-1 agreement with last layer"),
    ("cosine_to_last", "cosine to last layer"),
)
_GENERATION_CURVES = (("gsm8k_accuracy", "GSM8K answer accuracy"), ("token_f1", "token-F1"))


def short_name(name_or_path: str) -> str:
    """The last path component of a model name, for legends and headings."""
    return Path(str(name_or_path).rstrip("/")).name or str(name_or_path)


def require_matplotlib() -> None:
    """Raise a one-line ``ImportError`` naming the fix when matplotlib (the ``eval`` extra) is missing.

    Called before an evaluation starts, so a missing plotting library is found before minutes of model work.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "soft-peft eval draws its plots with matplotlib, which is missing here: "
            '`pip install "soft-peft[eval]"` (or `pip install matplotlib`).'
        ) from None


def _figure(**kwargs):
    """A matplotlib figure drawn on its own Agg canvas: files only, and the user's pyplot backend is left alone."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def plot_exit_curves(per_model: dict[str, dict[int, dict[str, float]]], path: str) -> str:
    """One panel per metric against exit layer, every model on the same axes.

    Args:
        per_model: ``{label: {layer: {metric: value}}}``.
        path: PNG file to write.

    Returns:
        ``path``.
    """
    present = {key for metrics in per_model.values() for values in metrics.values() for key in values}
    panels = [c for c in _CURVES + _GENERATION_CURVES if c[0] in present]
    figure = _figure(figsize=(4.2 * len(panels), 3.6))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels, strict=True):
        for label, metrics in per_model.items():
            layers = [k for k in sorted(metrics) if key in metrics[k]]
            axis.plot(layers, [metrics[k][key] for k in layers], marker="o", label=label)
        axis.set_xlabel("exit (decoder layers)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_similarity(matrices: dict[tuple[str, str], tuple[list, list[int], list[int]]], title: str, path: str) -> str:
    """Heat-maps of exit-by-exit similarity matrices, one panel per ``(row model, column model)`` pair.

    Args:
        matrices: ``{(row label, column label): (matrix I x J, row exits, column exits)}``.
        title: Figure title (the metric).
        path: PNG file to write.

    Returns:
        ``path``.
    """
    count = len(matrices)
    columns = 2 if count > 1 else 1
    rows = math.ceil(count / columns)
    figure = _figure(figsize=(5.2 * columns, 4.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, ((row_label, column_label), (matrix, row_exits, column_exits)) in zip(
        axes.flat, matrices.items(), strict=False
    ):
        image = axis.imshow(matrix, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(column_exits)), [str(k) for k in column_exits])
        axis.set_yticks(range(len(row_exits)), [str(k) for k in row_exits])
        axis.set_xlabel(f"{column_label} exit (reference)")
        axis.set_ylabel(f"{row_label} exit")
        low, high = image.get_clim()
        for i, line in enumerate(matrix):
            for j, value in enumerate(line):
                # Dark text on the bright end of viridis, light text elsewhere
                color = "black" if value > low + 0.6 * (high - low) else "white"
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
        figure.colorbar(image, ax=axis)
    for axis in list(axes.flat)[count:]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _table(metrics: dict[int, dict[str, float]]) -> list[str]:
    keys = []
    for values in metrics.values():
        keys += [k for k in values if k not in keys]
    lines = ["| exit | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for layer in sorted(metrics):
        lines.append(f"| {layer} | " + " | ".join(_format(metrics[layer].get(k, "")) for k in keys) + " |")
    return lines


def write_outputs(
    output_dir: str,
    names: list[str],
    evaluation: ExitEvaluation,
    generation_scores: list[dict[int, dict[str, float]]],
    judgements: dict[int, dict[str, float]],
    settings: dict,
    samples: dict | None = None,
) -> dict:
    """Write ``metrics.json``, ``report.md``, ``exit_curves.png`` and ``similarity_{kl,cosine}.png``.

    Args:
        output_dir: Folder (created when missing).
        names: Model A's name, and model B's when comparing.
        evaluation: Output of [`evaluate_exits`].
        generation_scores: Per model, ``{layer: scores}`` from [`score_generations`] (empty dicts without generation).
        judgements: ``{layer: {"wins", "losses", "ties", "win_rate"}}`` of model A's exit against model B's last layer.
        settings: The run's settings, stored as is.
        samples: One example's prompt, reference and generations, shown in the report.

    Returns:
        The ``metrics.json`` content.
    """
    os.makedirs(output_dir, exist_ok=True)
    per_model = []
    for index, metrics in enumerate(evaluation.metrics):
        merged = {k: dict(v) for k, v in metrics.items()}
        for layer, scores in generation_scores[index].items():
            merged[layer].update(scores)
        per_model.append(merged)
    labels = [short_name(n) for n in names]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({tag})" for label, tag in zip(labels, ("A", "B"), strict=False)]
    result = _metrics_json(names, labels, per_model, evaluation, judgements, settings, samples)
    out = Path(output_dir)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    _write_plots(out, labels, per_model, evaluation)
    lines = _report_lines(names, labels, per_model, judgements, settings, samples)
    (out / "report.md").write_text("\n".join(lines))
    return result


def _metrics_json(names, labels, per_model, evaluation: ExitEvaluation, judgements, settings, samples) -> dict:
    result = {
        "model": names[0],
        "exits": {str(k): v for k, v in per_model[0].items()},
        "settings": settings,
    }
    if len(names) == 2:
        result["compare_model"] = names[1]
        result["compare_exits"] = {str(k): v for k, v in per_model[1].items()}
    result["similarity"] = {
        "definition": "kl[i][j] = mean over completion tokens of KL(P_column_exit_j || P_row_exit_i); cosine of "
        "normed hidden states",
        "pairs": {
            f"{labels[a]} vs {labels[b]}": {
                "row_exits": evaluation.exits[a],
                "column_exits": evaluation.exits[b],
                "kl": evaluation.kl[(a, b)],
                "cosine": evaluation.cosine[(a, b)],
            }
            for a, b in evaluation.kl
        },
    }
    if judgements:
        result["judge"] = {str(k): v for k, v in judgements.items()}
    if samples:
        result["samples"] = samples
    return result


def _write_plots(out: Path, labels, per_model, evaluation: ExitEvaluation) -> None:
    plot_exit_curves(dict(zip(labels, per_model, strict=True)), str(out / "exit_curves.png"))
    for metric, title in (("kl", "KL divergence (nats)"), ("cosine", "cosine similarity of hidden states")):
        source = evaluation.kl if metric == "kl" else evaluation.cosine
        matrices = {
            (labels[a], labels[b]): (source[(a, b)], evaluation.exits[a], evaluation.exits[b]) for a, b in source
        }
        plot_similarity(matrices, title, str(out / f"similarity_{metric}.png"))


def _report_lines(names, labels, per_model, judgements, settings, samples) -> list[str]:
    lines = [f"# Per-exit evaluation of {names[0]}", ""]
    dataset = settings.get("dataset_name")
    # A single file is one split whatever the setting names (soft_peft.data.load_raw_dataset)
    split = "" if dataset and os.path.isfile(dataset) else f", split `{settings.get('dataset_test_split')}`"
    columns = {key for metrics in per_model for values in metrics.values() for key in values}
    lines += [
        f"Dataset `{dataset}` ({settings.get('dataset_format')}{split}), {settings.get('num_examples')} examples, "
        f"{settings.get('num_tokens')} scored completion tokens. The loss is measured on these rows: held-out data "
        "only if the model was not trained on them.",
        "",
        "`kl_to_last` = KL(P_last || P_exit); `agreement_with_last` = share of tokens whose argmax is the last "
        "layer's (about the greedy acceptance rate of drafting from that exit); `cosine_to_last` = cosine of normed "
        "hidden states; `*_other_last` compare against the other model's last layer."
        + (
            " `ms_per_token` is greedy `generate` wall time per generated token of the extracted sub-model (batch 1, "
            "prefill included)."
            if "ms_per_token" in columns
            else ""
        ),
        "",
    ]
    for label, metrics in zip(labels, per_model, strict=True):
        lines += [f"## {label}", "", *_table(metrics), ""]
    if judgements:
        lines += [f"## Pairwise judge: {labels[0]} exit vs {labels[-1]} last layer (both orders)", ""]
        lines += _table(judgements) + [""]
    lines += ["## Plots", "", "![per-exit curves](exit_curves.png)", ""]
    lines += ["![KL heat-maps](similarity_kl.png)", "", "![cosine heat-maps](similarity_cosine.png)", ""]
    if samples:
        lines += ["## One example", ""]
        lines += [f"**{key}**:\n\n```\n{text}\n```\n" for key, text in samples.items()]
    return lines
