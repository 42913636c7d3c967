"""The model card (``README.md``) of a SoFT model or of a sub-model extracted from one.

It states what a user needs before choosing an exit or publishing it: depth, parameter count, the model it came
from and its base model, the licence, the exits it was trained at and, when a ``soft-peft eval`` run exists, its
per-exit metrics. `soft-peft extract` writes one beside every sub-model; `SoFTTrainer.create_model_card` adds the
same section to TRL's card of a trained model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "add_soft_section",
    "card_metadata",
    "load_eval_metrics",
    "model_card_text",
    "model_label",
    "soft_card_section",
    "write_model_card",
]

_TAGS = ["soft-peft", "sorted-fine-tuning", "early-exit"]
_TRL_UNNAMED_BASE = "[None](https://huggingface.co/None)"


def card_metadata(folder: str | os.PathLike) -> dict:
    """The YAML metadata of ``folder/README.md`` (``license``, ``base_model``, ...), or ``{}`` when there is none.

    Args:
        folder: A local model folder; a Hub id or a folder without a card gives ``{}``.
    """
    from huggingface_hub import metadata_load

    path = Path(folder) / "README.md"
    return (metadata_load(path) or {}) if path.is_file() else {}


def load_eval_metrics(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """The per-exit metrics of a ``soft-peft eval`` run (its ``metrics.json``, or the folder holding it).

    Args:
        path: ``metrics.json`` or the eval ``--output_dir``.

    Returns:
        ``{exit: {metric: value}}`` with the numeric metrics only, exits sorted.

    Raises:
        ValueError: one line naming the file, when it is missing, not JSON or has no ``exits``.
    """
    path = Path(path)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass the metrics.json (or the folder) that `soft-peft eval` wrote.")
    try:
        exits = json.loads(path.read_text(encoding="utf-8")).get("exits")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{path}: not a `soft-peft eval` metrics.json ({type(error).__name__}).") from None
    if not isinstance(exits, dict) or not exits:
        raise ValueError(f"{path}: has no per-exit metrics (`exits`); is it a `soft-peft eval` metrics.json?")
    metrics = {}
    for layer, values in exits.items():
        numeric = {k: v for k, v in (values or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
        metrics[int(layer)] = numeric
    return dict(sorted(metrics.items()))


def _metrics_table(metrics: Mapping[int, Mapping[str, float]], marked: int | None) -> list[str]:
    names = sorted({name for values in metrics.values() for name in values})
    lines = ["| exit | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for layer, values in metrics.items():
        label = f"**{layer}** (this model)" if layer == marked else str(layer)
        cells = [f"{values[name]:.4g}" if name in values else "-" for name in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def model_label(name_or_path: str) -> str:
    """How a card names a model: a Hub id as is, a local folder by its name only (its full path would publish the
    training machine's layout with the card)."""
    from .hub import looks_like_hub_id

    if looks_like_hub_id(name_or_path) and not os.path.isdir(name_or_path):
        return name_or_path
    return Path(name_or_path).resolve().name


def soft_card_section(
    num_layers: int,
    num_parameters: int,
    source: str,
    base_model: str | None,
    license: str | None,
    exits_trained: Sequence[int] | None,
    source_layers: int | None = None,
    source_parameters: int | None = None,
    eval_metrics: Mapping[int, Mapping[str, float]] | None = None,
    invocations: Mapping[str, str] | None = None,
) -> str:
    """The markdown body describing a SoFT model or sub-model (no YAML header).

    Args:
        num_layers: Its decoder depth.
        num_parameters: Its parameter count (tied weights once).
        source: The model it was extracted from, or the trained model itself.
        base_model: The model training started from (``None``: unknown).
        license: The licence (``None``: not recorded; the base model's applies).
        exits_trained: The SoFT exits the source was trained at (``None``: not trained with SoFT).
        source_layers: The source's depth, for a sub-model (``None``: this is the full model).
        source_parameters: The source's parameter count, for a sub-model.
        eval_metrics: Per-exit metrics from ``soft-peft eval`` (``None``: none given).
        invocations: Serving snippets by engine, from [`~soft_peft.serving.draft_model_invocations`].

    Returns:
        Markdown text.
    """
    depth = f"{num_layers} decoder layers" + (f" (the first {num_layers} of {source_layers})" if source_layers else "")
    share = f" ({num_parameters / source_parameters:.0%} of the source)" if source_parameters else ""
    if exits_trained is None:
        trained = "none recorded: not trained with SoFT, so early exits are untrained"
    else:
        trained = ", ".join(map(str, exits_trained))
        if source_layers and num_layers not in exits_trained:
            trained += f" (**{num_layers} is not one of them: this sub-model was not trained as one**)"
    lines = [
        "| | |",
        "|---|---|",
        f"| depth | {depth} |",
        f"| parameters | {num_parameters:,}{share} |",
        f"| {'extracted from' if source_layers else 'model'} | `{model_label(source)}` |",
        f"| base model | {f'`{model_label(base_model)}`' if base_model else 'not recorded'} |",
        f"| licence | {license or 'not recorded: the base model licence applies'} |",
        f"| SoFT exits trained | {trained} |",
    ]
    if source_layers:
        lines += [
            "",
            f"Exit {num_layers} of a model fine-tuned with Sorted Fine-Tuning (SoFT, arXiv 2309.08968): its first "
            f"{num_layers} layers, then the model's own final norm and LM head. It is a plain transformers model "
            "and shares the source's tokenizer, so it can serve as the source's draft model in speculative decoding.",
        ]
    else:
        lines += [
            "",
            "Fine-tuned with Sorted Fine-Tuning (SoFT, arXiv 2309.08968): every trained exit is a usable sub-model. "
            "Save one as a plain transformers model with `soft-peft extract --model_name_or_path THIS_FOLDER "
            "--num_layers K --output_dir OUT`.",
        ]
    if eval_metrics:
        lines += ["", "## Evaluation (`soft-peft eval`, per exit)", ""]
        lines += _metrics_table(eval_metrics, num_layers if source_layers else None)
    if invocations:
        lines += ["", "## Serving as a draft model", ""]
        for engine, language in (("transformers", "python"), ("vllm", "python"), ("vllm serve", "bash")):
            lines += [f"{engine}:", "", f"```{language}", invocations[engine], "```", ""]
        lines += ["SGLang:", "", "```bash", invocations["sglang"], "```"]
    return "\n".join(lines) + "\n"


def model_card_text(title: str, license: str | None, base_model: str | None, section: str) -> str:
    """A complete card: YAML metadata (licence, base model when it is a Hub id, tags), a title and ``section``.

    Args:
        title: The card's heading.
        license: A Hub licence id, or ``None`` (written as ``other``).
        base_model: The base model's Hub id, or ``None``; a local path is left out of the metadata.
        section: The body, from [`soft_card_section`].
    """
    from huggingface_hub import ModelCardData

    from .hub import looks_like_hub_id

    hub_base = base_model if base_model and looks_like_hub_id(base_model) and not os.path.isdir(base_model) else None
    data = ModelCardData(
        license=license or "other",
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(_TAGS),
    )
    return f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{section}"


def write_model_card(folder: str | os.PathLike, title: str, license: str | None, base_model: str | None, **facts):
    """Write ``folder/README.md``: [`model_card_text`] with [`soft_card_section`]``(**facts)``.

    Args:
        folder: The saved model's folder.
        title: The card's heading.
        license: The licence (``None``: not recorded).
        base_model: The model training started from.
        **facts: The other arguments of [`soft_card_section`].

    Returns:
        The card's path.
    """
    path = Path(folder) / "README.md"
    section = soft_card_section(license=license, base_model=base_model, **facts)
    path.write_text(model_card_text(title, license, base_model, section), encoding="utf-8")
    return path


def add_soft_section(readme: str | os.PathLike, license: str | None, **facts) -> None:
    """Append the SoFT section (``## Sorted Fine-Tuning (SoFT)``, [`soft_card_section`]``(**facts)``) to an existing
    card such as TRL's, adding the SoFT tags and, when known and absent, the licence to its metadata.

    Args:
        readme: The card's path (``README.md``).
        license: The licence (``None``: not recorded).
        **facts: The other arguments of [`soft_card_section`].
    """
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme)
    # TRL links a base model it could not name (a local folder) as [None](https://huggingface.co/None)
    card.text = card.text.replace(_TRL_UNNAMED_BASE, "a local model")
    card.data.tags = sorted(set(card.data.tags or []) | set(_TAGS))
    if license and not card.data.license:
        card.data.license = license
    section = soft_card_section(license=license, **facts)
    card.text = card.text.rstrip("\n") + "\n\n## Sorted Fine-Tuning (SoFT)\n\n" + section
    card.save(readme)
