"""The whole `soft-peft eval` run as a library call: load, resolve exits, evaluate, generate, judge, write outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..checkpoints import load_causal_lm
from ..data_rows import DatasetFormatError
from ..exits import parse_exit_layers, recorded_exit_layers
from ..hub import resolve_model_path
from ..model_layout import num_decoder_layers
from .examples import load_eval_dataset, tokenize_examples
from .generation import generate_at_exits, score_generations
from .judge import LMJudge, judge_pairwise
from .per_exit import evaluate_exits
from .report import require_matplotlib, write_outputs

__all__ = ["EvalSettings", "every_fourth_layer", "resolve_eval_exits", "run_evaluation"]

DEFAULT_KEYWORD = "default"


@dataclass
class EvalSettings:
    """Settings of one evaluation run (the `soft-peft eval` options).

    Attributes:
        model_name_or_path: Model A (a folder or Hub name).
        dataset_name: Dataset file, folder or Hub name (see [`load_eval_dataset`]).
        output_dir: Where ``metrics.json``, ``report.md`` and the PNG plots go.
        compare_to: Model B, compared exit by exit with model A (same tokenizer vocabulary).
        exits: The exits to evaluate: ``None`` (the recorded ``soft_exit_layers``), ``"default"`` (every 4th layer
            plus the last), or a list / string accepted by [`parse_exit_layers`].
        max_samples: Evaluate the first ``max_samples`` rows only.
        dataset_test_split, dataset_config: The split evaluated (TRL's name for it; a single file is its one split
            whatever this says) and the Hub configuration.
        dataset_format: The rows' format, one of [`~soft_peft.data.DATASET_FORMATS`] (training's vocabulary);
            ``"auto"`` tells it by the columns.
        batch_size: Examples per forward.
        max_length: Truncate each example to this many tokens.
        token_chunk_size: Completion tokens per head pass.
        generate: Also greedy-decode each exit and score it.
        max_new_tokens: Generation budget.
        generate_samples: Rows used for generation (default: all evaluated rows).
        judge_model: A local causal LM used as the pairwise judge (needs ``compare_to`` and ``generate``).
        judge: A judge callable instead of ``judge_model`` (library use).
        dtype: ``float32`` or ``bfloat16``.
        progress: Show tqdm bars.
    """

    model_name_or_path: str
    dataset_name: str
    output_dir: str
    compare_to: str | None = None
    exits: str | list[int] | None = None
    max_samples: int | None = None
    dataset_test_split: str = "test"
    dataset_config: str | None = None
    dataset_format: str = "auto"
    batch_size: int = 4
    max_length: int | None = 1024
    token_chunk_size: int = 64
    generate: bool = False
    max_new_tokens: int = 256
    generate_samples: int | None = None
    judge_model: str | None = None
    judge: Callable | None = field(default=None, repr=False)
    dtype: str = "float32"
    progress: bool = True


def every_fourth_layer(num_layers: int) -> list[int]:
    """Layers ``4, 8, ...`` plus the last: the exits evaluated by ``--exits default``."""
    return sorted(set(range(4, num_layers + 1, 4)) | {num_layers})


def resolve_eval_exits(model: nn.Module, spec, name: str, fallback: list[int] | None = None) -> list[int]:
    """The exits to evaluate for ``model``.

    Args:
        model: The model.
        spec: ``None`` (recorded exits, else ``fallback``), ``"default"`` (every 4th layer plus the last) or an
            explicit list / string.
        name: The model's name, for messages.
        fallback: Exits to use when ``spec`` is ``None`` and the model records none (the other compared model's).

    Raises:
        ValueError: when nothing is recorded, no ``spec`` and no ``fallback`` are given, or for exits beyond the
            model's depth.
    """
    depth = num_decoder_layers(model)
    if isinstance(spec, str) and spec.strip().lower() == DEFAULT_KEYWORD:
        return every_fourth_layer(depth)
    if spec is None:
        recorded = recorded_exit_layers(model)
        if recorded is not None:
            return parse_exit_layers(recorded, depth)
        if fallback is not None:
            return parse_exit_layers([k for k in fallback if k <= depth] or [depth], depth)
        raise ValueError(
            f"{name} records no SoFT exits (`soft_exit_layers` is missing from its config.json: it was not trained "
            f"with SoFTTrainer). Choose the exits: --exits default (every 4th layer plus the last: "
            f"{every_fourth_layer(depth)}) or an explicit list such as --exits {max(1, depth // 2)},{depth}."
        )
    try:
        return parse_exit_layers(spec, depth, "exits")
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _load(name_or_path: str, dtype: str):
    from transformers import AutoTokenizer

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}.")
    # A PEFT adapter folder loads with its base model, and its exits recorded beside it
    model = load_causal_lm(name_or_path, dtype=getattr(torch, dtype))
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


def _task(dataset_format: str, references: list[str]) -> str:
    if dataset_format == "gsm8k" or all("####" in r for r in references):
        return "gsm8k"
    return "text"


def _load_compared_models(settings: EvalSettings, paths: dict) -> tuple[list, list[str], object]:
    """Model A, and model B when comparing (same tokenizer vocabulary), with their names and A's tokenizer."""
    model_a, tokenizer = _load(paths[settings.model_name_or_path], settings.dtype)
    models, names = [model_a], [settings.model_name_or_path]
    if settings.compare_to is not None:
        model_b, tokenizer_b = _load(paths[settings.compare_to], settings.dtype)
        if tokenizer_b.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"{settings.compare_to} has a different tokenizer vocabulary than {settings.model_name_or_path}; "
                "exit-by-exit comparison needs both models to score the same tokens."
            )
        models.append(model_b)
        names.append(settings.compare_to)
    return models, names, tokenizer


def _generate(settings: EvalSettings, models, tokenizer, subset, evaluation, dataset_format):
    """Greedy generations of every model at each exit: their texts, scores and one shown sample."""
    references = [e.reference for e in subset]
    task = _task(dataset_format, references)
    texts, generation_scores = [], [{} for _ in models]
    for index, model in enumerate(models):
        generations = generate_at_exits(
            model, tokenizer, subset, evaluation.exits[index], settings.max_new_tokens, settings.progress
        )
        generation_scores[index] = {k: score_generations(g, references, task) for k, g in generations.items()}
        texts.append({k: g.texts for k, g in generations.items()})
    samples = {"prompt": subset[0].prompt, "reference": references[0]}
    samples.update({f"model_{i}_exit_{k}": t[0] for i, per in enumerate(texts) for k, t in per.items()})
    return texts, generation_scores, samples


def _judge(settings: EvalSettings, paths: dict, subset, texts, evaluation) -> dict:
    """Pairwise judgements of model A's exits against model B's last layer."""
    judge = settings.judge
    if judge is None:
        judge_model, judge_tokenizer = _load(paths[settings.judge_model], settings.dtype)
        judge = LMJudge(judge_model, judge_tokenizer)
    prompts = [e.prompt for e in subset]
    reference_texts = texts[1][evaluation.exits[1][-1]]  # model B's last layer
    judgements = {}
    for layer, generated in texts[0].items():
        result = judge_pairwise(prompts, generated, reference_texts, judge, settings.progress)
        judgements[layer] = {
            "wins": result.wins,
            "losses": result.losses,
            "ties": result.ties,
            "win_rate": result.win_rate,
        }
    return judgements


def run_evaluation(settings: EvalSettings) -> dict:
    """Run the evaluation and write ``metrics.json``, ``report.md`` and the plots to ``settings.output_dir``.

    Returns:
        The ``metrics.json`` content: ``{"exits": {"<k>": {...}}, "settings": {...}, ...}``; with ``compare_to``
        also ``"compare_exits"`` (model B's per-exit numbers) and ``"similarity"`` (the matrices).

    Raises:
        ValueError / DatasetFormatError: for unusable exits, models or datasets, with the fix in the message.
    """
    require_matplotlib()  # the plots come last: fail before the models load, not after the evaluation
    if settings.judge_model is not None and settings.judge is not None:
        raise ValueError("Give either judge_model or judge, not both.")
    wants_judge = settings.judge_model is not None or settings.judge is not None
    if wants_judge and (settings.compare_to is None or not settings.generate):
        raise ValueError("Pairwise judging compares generations of two models: it needs --compare_to and --generate.")
    # Every model is checked before any loads: a missing folder or an unreachable Hub fails at once, in one line
    paths = {
        name: resolve_model_path(name)
        for name in (settings.model_name_or_path, settings.compare_to, settings.judge_model)
        if name is not None
    }
    models, names, tokenizer = _load_compared_models(settings, paths)
    model_a = models[0]
    # Without --exits, a model that records no exits borrows the other compared model's
    fallback = recorded_exit_layers(models[1]) if len(models) == 2 else None
    exits = [resolve_eval_exits(model_a, settings.exits, names[0], fallback=fallback)]
    if len(models) == 2:
        exits.append(resolve_eval_exits(models[1], settings.exits, names[1], fallback=exits[0]))
    dataset, dataset_format = load_eval_dataset(
        settings.dataset_name,
        settings.max_samples,
        settings.dataset_test_split,
        settings.dataset_config,
        dataset_format=settings.dataset_format,
    )
    examples = tokenize_examples(dataset, tokenizer, dataset_format, settings.max_length)
    if not examples:
        raise DatasetFormatError(f"{settings.dataset_name}: no example to evaluate.")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    evaluation = evaluate_exits(
        models, exits, examples, pad_token_id, settings.batch_size, settings.token_chunk_size, settings.progress
    )
    generation_scores, judgements, samples = [{}, {}][: len(models)], {}, {}
    if settings.generate:
        subset = examples[: settings.generate_samples] if settings.generate_samples else examples
        texts, generation_scores, samples = _generate(settings, models, tokenizer, subset, evaluation, dataset_format)
        if wants_judge:
            judgements = _judge(settings, paths, subset, texts, evaluation)
    recorded = {k: v for k, v in asdict(settings).items() if k != "judge"}
    recorded.update(
        dataset_format=dataset_format,
        num_examples=len(examples),
        num_tokens=evaluation.num_tokens,
        exits=evaluation.exits[0],
        compare_exits=evaluation.exits[1] if len(models) == 2 else None,
        judge=None if not wants_judge else settings.judge_model or getattr(settings.judge, "__name__", "callable"),
    )
    return write_outputs(settings.output_dir, names, evaluation, generation_scores, judgements, recorded, samples)
