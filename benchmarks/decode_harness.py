"""The decoding benchmark harness behind ``python -m benchmarks.decode_cost`` (not part of the library).

Every method decodes the same prompts in the same run, interleaved prompt by prompt so that a change in machine load
hits all of them alike. Speed is generated tokens (up to and including EOS) per second of wall time; quality is
compared with plain greedy ``generate`` at the same batch size, and GSM8K accuracy with the evaluation's numeric
answer check. Also here: the decoding commands' shared flags, model loading, report writing and decoder flags.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.common import add_data_argument, gsm8k_split, parse_ints, smollm2_path
from soft_peft import dynamic_generate, self_speculative_generate
from soft_peft.evaluation.metrics import gsm8k_exact_match
from soft_peft.model_layout import num_decoder_layers

# The checkpoint the decoding tables measured: `bash benchmarks/decode_checkpoint.sh` makes it
DEFAULT_MODEL = Path.home() / ".cache" / "soft_peft" / "runs" / "gsm8k-soft-450"

MODES = ("self-speculative", "dynamic", "assistant_early_exit")


@dataclass
class DecodeMethod:
    """One decoding setting: ``run(input_ids, attention_mask) -> (sequences, counters)``.

    Attributes:
        mode: ``"greedy"``, ``"self-speculative"``, ``"dynamic"`` or ``"assistant_early_exit"``.
        setting: Human-readable settings (draft exit, thresholds, ...).
        run: Callable decoding one batch; counters may hold ``drafted``, ``accepted`` and ``depth_sum``/``steps``.
        batch_one_only: The method cannot decode a batch (transformers' assisted generation).
    """

    mode: str
    setting: str
    run: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict]]
    batch_one_only: bool = False


@dataclass
class MethodResult:
    """Totals of one method at one batch size over all prompts.

    Attributes:
        mode: The method's mode.
        setting: The method's settings.
        batch_size: Prompts per batch.
        seconds: Decoding wall time, summed over batches.
        tokens: Generated tokens up to and including EOS, summed over prompts.
        counters: Summed counters from the method (``drafted``, ``accepted``, ``depth_sum``, ``steps``).
        outputs: Per prompt, the new tokens up to EOS.
    """

    mode: str
    setting: str
    batch_size: int
    seconds: float = 0.0
    tokens: int = 0
    counters: dict = field(default_factory=dict)
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (up to and including EOS) per second of decoding wall time."""
        return self.tokens / self.seconds if self.seconds else 0.0


def _add(counters: dict, extra: dict) -> None:
    for key, value in extra.items():
        counters[key] = counters.get(key, 0) + value


def build_methods(
    model: nn.Module,
    max_new_tokens: int,
    draft_exits: Sequence[int],
    num_draft_tokens: int | str,
    dynamic_exits: Sequence[int] | None,
    thresholds: Sequence[float],
    assistant_exits: Sequence[int],
    kv_fills: Sequence[str] = ("recompute",),
    vocab: torch.Tensor | None = None,
    modes: Sequence[str] | None = None,
    dynamic_rules: Sequence[str] = ("exact",),
    draft_stop_thresholds: Sequence[float | None] = (None,),
    early_draft_exit_sets: Sequence[Sequence[int]] = ((),),
) -> list[DecodeMethod]:
    """The methods to compare: greedy first (the reference), then every requested setting.

    Args:
        model: The causal LM.
        max_new_tokens: Tokens to generate per prompt.
        draft_exits: Draft exits for self-speculative decoding.
        num_draft_tokens: Draft length (int or ``"adaptive"``).
        dynamic_exits: Exits checked by dynamic inference (``None``: its default).
        thresholds: One dynamic run per threshold.
        assistant_exits: One ``generate(assistant_early_exit=k)`` run per exit.
        kv_fills: Dynamic KV fill modes; every threshold runs with the first, the middle threshold with the others.
        vocab: Token ids for drafting and confidence pre-checks (``draft_vocab`` / ``check_vocab``); ``None``: the
            full head.
        modes: Modes to include besides greedy (default: all four).
        dynamic_rules: Exit rules to run every threshold with: ``"exact"`` (full-head confidence, confirmed after a
            ``vocab`` pre-check) and/or ``"subset"`` (``exit_on_subset=True``: decided and emitted on ``vocab``
            alone, with the first KV fill).
        draft_stop_thresholds: Run every draft exit with each of these ``draft_stop_threshold`` values (``None``:
            no confidence stop).
        early_draft_exit_sets: ``early_draft_exits`` settings to run every draft exit with a stop threshold with;
            exits at or above the draft exit are dropped, and settings left empty run only once.
    """
    _check_method_options(modes, dynamic_rules, vocab)
    modes = MODES if modes is None else modes
    subset = "" if vocab is None else f", {vocab.numel()}-token vocab"
    methods = [DecodeMethod("greedy", "generate(do_sample=False)", _greedy(model, max_new_tokens))]
    for draft_exit in draft_exits if "self-speculative" in modes else ():
        for stop in draft_stop_thresholds:
            stopping = "" if stop is None else f", stop at confidence <= {stop:g}"
            # Exits at or above the draft exit are dropped; settings that become equal run once
            early_sets = dict.fromkeys(tuple(k for k in early if k < draft_exit) for early in early_draft_exit_sets)
            for early in [()] if stop is None else early_sets:
                first = f", drafts from {','.join(map(str, early))} first" if early else ""
                setting = f"draft exit {draft_exit}, {num_draft_tokens} drafts{subset}{stopping}{first}"
                run = _speculative(model, max_new_tokens, draft_exit, num_draft_tokens, vocab, stop, early)
                methods.append(DecodeMethod("self-speculative", setting, run))
    middle = thresholds[len(thresholds) // 2] if thresholds else None
    for threshold in thresholds if "dynamic" in modes else ():
        for kv_fill in kv_fills if "exact" in dynamic_rules else ():
            if kv_fill != kv_fills[0] and threshold != middle:
                continue
            run = _dynamic(model, max_new_tokens, dynamic_exits, threshold, kv_fill, vocab)
            methods.append(DecodeMethod("dynamic", f"threshold {threshold:g}, kv {kv_fill}{subset}", run))
        if "subset" in dynamic_rules:
            setting = f"threshold {threshold:g}, kv {kv_fills[0]}, exits on the {vocab.numel()}-token vocab"
            run = _dynamic(model, max_new_tokens, dynamic_exits, threshold, kv_fills[0], vocab, exit_on_subset=True)
            methods.append(DecodeMethod("dynamic", setting, run))
    for layer in assistant_exits if "assistant_early_exit" in modes else ():
        run = _assisted(model, max_new_tokens, layer)
        methods.append(DecodeMethod("assistant_early_exit", f"k={layer}", run, batch_one_only=True))
    return methods


def _check_method_options(modes: Sequence[str] | None, dynamic_rules: Sequence[str], vocab) -> None:
    unknown = set(modes or ()) - set(MODES)
    if unknown:
        raise ValueError(f"Unknown modes {sorted(unknown)}; choose from {list(MODES)}.")
    bad_rules = set(dynamic_rules) - {"exact", "subset"}
    if bad_rules or not dynamic_rules:
        raise ValueError(f"`dynamic_rules` takes 'exact' and/or 'subset', got {list(dynamic_rules)}.")
    if "subset" in dynamic_rules and vocab is None:
        raise ValueError("The 'subset' dynamic rule needs `vocab`: the subset the early exits decide on.")


# Each builder returns a DecodeMethod's `run(input_ids, attention_mask) -> (sequences, counters)`


def _greedy(model: nn.Module, max_new_tokens: int):
    def run(input_ids, attention_mask):
        return model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens
        ), {}

    return run


def _speculative(model, max_new_tokens, draft_exit, num_draft_tokens, vocab, stop, early):
    num_layers = num_decoder_layers(model)

    def run(input_ids, attention_mask):
        out = self_speculative_generate(
            model, input_ids, draft_exit, max_new_tokens, attention_mask, num_draft_tokens=num_draft_tokens,
            draft_vocab=vocab, draft_stop_threshold=stop, early_draft_exits=early,
        )  # fmt: skip
        # Draft cost in full forwards: each drafted token runs its exit's share of the layers
        draft_cost = sum(count * exit / num_layers for exit, count in out.stats.drafts_by_exit.items())
        counters = {"drafted": out.stats.drafted, "accepted": out.stats.accepted, "cycles": out.stats.cycles}
        return out.sequences, {**counters, "draft_cost": draft_cost}

    return run


def _dynamic(model, max_new_tokens, dynamic_exits, threshold, kv_fill, vocab, exit_on_subset=False):
    def run(input_ids, attention_mask):
        out = dynamic_generate(
            model, input_ids, dynamic_exits, threshold, max_new_tokens, attention_mask, kv_fill=kv_fill,
            check_vocab=vocab, exit_on_subset=exit_on_subset,
        )  # fmt: skip
        return out.sequences, {"depth_sum": float(out.stats.exits_taken.sum()), "steps": out.stats.new_tokens}

    return run


def _assisted(model: nn.Module, max_new_tokens: int, layer: int):
    def run(input_ids, attention_mask):
        sequences = model.generate(
            input_ids, attention_mask=attention_mask, assistant_early_exit=layer, do_sample=False,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        return sequences, {}

    return run


def gsm8k_benchmark_data(path: str, num_prompts: int) -> tuple[list[str], list[str], list[str]]:
    """Benchmark inputs from GSM8K train (`openai/gsm8k` or a local JSONL copy): the study's held-out split's prompts
    and references, and the training side.

    Returns:
        ``(prompts, references, train_completions)``: the first ``num_prompts`` prompts of
        ``held_out_split(test_size=200, seed=0)`` with their reference completions (ending in ``#### N``), and every
        completion outside that split (calibration text for ``frequent_token_ids``).
    """
    train, held_out = gsm8k_split(path)
    rows = held_out.select(range(min(num_prompts, len(held_out))))
    return list(rows["prompt"]), list(rows["completion"]), list(train["completion"])


def _new_tokens(sequences: torch.Tensor, prompt_length: int, eos_ids: set[int]) -> list[list[int]]:
    rows = []
    for row in sequences[:, prompt_length:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        rows.append(row[:end])
    return rows


def run_decode_benchmark(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    methods: Sequence[DecodeMethod],
    batch_sizes: Sequence[int] = (1, 4),
    warmup: bool = True,
) -> list[MethodResult]:
    """Decode ``prompts`` with every method at every batch size, interleaved batch by batch.

    Args:
        model: The causal LM (eval mode).
        tokenizer: Its tokenizer; batches are left-padded (the tokenizer's own ``padding_side`` is left as it is).
        prompts: Prompt strings.
        methods: From [`build_methods`]; the first is the greedy reference.
        batch_sizes: Batch sizes to measure.
        warmup: Decode a few tokens before timing (allocator and kernel warm-up).

    Returns:
        One [`MethodResult`] per (method, batch size) that can run at that size.
    """
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    results = []
    for batch_size in batch_sizes:
        runnable = [m for m in methods if batch_size == 1 or not m.batch_one_only]
        totals = [MethodResult(m.mode, m.setting, batch_size) for m in runnable]
        batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        if warmup:  # a short decode, so the first timed method does not pay the allocator's first-use costs
            encoded = tokenizer(batches[0][:1], return_tensors="pt")
            model.generate(encoded.input_ids[:, :8], do_sample=False, max_new_tokens=4)
        for texts in tqdm(batches, desc=f"batch {batch_size}"):
            encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            mask = encoded.attention_mask if len(texts) > 1 else None
            for method, total in zip(runnable, totals, strict=True):
                started = time.perf_counter()
                sequences, counters = method.run(encoded.input_ids, mask)
                total.seconds += time.perf_counter() - started
                rows = _new_tokens(sequences, encoded.input_ids.shape[1], eos_ids)
                total.tokens += sum(len(row) for row in rows)
                total.outputs.extend(rows)
                _add(total.counters, counters)
        results.extend(totals)
    return results


def _agreement(rows: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    exact = sum(row == ref for row, ref in zip(rows, reference, strict=True)) / len(reference)
    same = sum(sum(a == b for a, b in zip(row, ref, strict=False)) for row, ref in zip(rows, reference, strict=True))
    return exact, same / max(sum(len(ref) for ref in reference), 1)


def projected_speedup(counters: dict) -> float | None:
    """Self-speculative decoding's speedup over greedy under an accelerator cost model, from measured counters: a
    verify pass costs one forward whatever the number of drafted tokens (batch 1 on a GPU is memory-bound), and a
    draft token from exit ``k`` of ``L`` costs ``k / L`` of a forward. A cycle emits its accepted drafts plus the
    verifier's own token, where greedy emits one token per forward:
    ``(accepted + cycles) / (draft_cost + cycles)``. A projection, not a measurement; ``None`` without cycles."""
    if not counters.get("cycles"):
        return None
    return (counters["accepted"] + counters["cycles"]) / (counters["draft_cost"] + counters["cycles"])


def summary_rows(results: Sequence[MethodResult], tokenizer, references: Sequence[str | None]) -> list[dict]:
    """One dict per result: speed, ratios to greedy (and to the fastest ``assistant_early_exit`` setting),
    acceptance, average exit depth and quality against greedy at the same batch size.

    Args:
        results: From [`run_decode_benchmark`]; the first of each batch size is the greedy reference.
        tokenizer: Decodes outputs for the GSM8K answer check.
        references: Reference GSM8K completions (ending in ``#### N``), one per prompt; ``None`` counts as wrong.

    Returns:
        Dicts with ``batch``, ``mode``, ``setting``, ``tokens_per_second``, ``vs_greedy``, ``vs_assistant``,
        ``acceptance``, ``avg_depth``, ``accepted_per_cycle``, ``projected_speedup`` (``None`` where they do not
        apply), ``exact_match``, ``tokens_equal_greedy`` and ``gsm8k_accuracy``.
    """
    rows = []
    for result in results:
        same_batch = [r for r in results if r.batch_size == result.batch_size]
        greedy = same_batch[0]
        assisted_runs = [r for r in same_batch if r.mode == "assistant_early_exit"]
        assisted = max(assisted_runs, key=lambda r: r.tokens_per_second) if assisted_runs else None
        exact, agree = _agreement(result.outputs, greedy.outputs)
        # Numeric comparison of the final numbers, as the evaluation reports it ("18" equals "18.0")
        correct = [
            reference is not None
            and gsm8k_exact_match(tokenizer.decode(row, skip_special_tokens=True), reference) == 1
            for row, reference in zip(result.outputs, references, strict=True)
        ]
        counters = result.counters
        rows.append(
            {
                "batch": result.batch_size,
                "mode": result.mode,
                "setting": result.setting,
                "tokens_per_second": result.tokens_per_second,
                "vs_greedy": result.tokens_per_second / greedy.tokens_per_second,
                "vs_assistant": (
                    result.tokens_per_second / assisted.tokens_per_second
                    if assisted and result is not assisted
                    else None
                ),
                "acceptance": counters["accepted"] / counters["drafted"] if counters.get("drafted") else None,
                "avg_depth": counters["depth_sum"] / counters["steps"] if counters.get("steps") else None,
                "accepted_per_cycle": counters["accepted"] / counters["cycles"] if counters.get("cycles") else None,
                "projected_speedup": projected_speedup(counters),
                "exact_match": exact,
                "tokens_equal_greedy": agree,
                "gsm8k_accuracy": sum(correct) / len(correct),
            }
        )
    return rows


def format_table(results: Sequence[MethodResult], tokenizer, references: Sequence[str | None]) -> str:
    """[`summary_rows`] as a markdown table."""

    def fixed(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| batch | mode | setting | tokens/s | x greedy | x fastest assistant_early_exit | acceptance | avg depth "
        "| exact match | tokens = greedy | GSM8K acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary_rows(results, tokenizer, references):
        lines.append(
            f"| {row['batch']} | {row['mode']} | {row['setting']} | {row['tokens_per_second']:.1f} "
            f"| {row['vs_greedy']:.2f} | {fixed(row['vs_assistant'], 2)} | {fixed(row['acceptance'], 2)} "
            f"| {fixed(row['avg_depth'], 1)} "
            f"| {row['exact_match']:.2f} | {row['tokens_equal_greedy']:.3f} | {row['gsm8k_accuracy']:.2f} |"
        )
    return "\n".join(lines)


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """The SoFT checkpoint at ``path``, or the untrained SmolLM2-135M-Instruct with a warning when it is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").exists():
        fallback = smollm2_path()
        warnings.warn(
            f"No checkpoint at {path}; benchmarking the untrained model {fallback} instead. Make the SoFT checkpoint "
            "with `bash benchmarks/decode_checkpoint.sh`.",
            stacklevel=2,
        )
        path = fallback
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def emit(header: list[str], table: str, output: str | None) -> None:
    """Print the header lines (model, machine, command) and the markdown table; also write them to ``output``."""
    text = "\n".join(header) + table + "\n"
    print(text)
    if output:
        Path(output).write_text(text)


def parse_draft_stop_thresholds(text: str) -> list[float | None]:
    """``"none,0.5"`` -> ``[None, 0.5]``: the command-line form of ``build_methods(draft_stop_thresholds=...)``."""
    return [None if part.strip().lower() == "none" else float(part) for part in text.split(",") if part.strip()]


def parse_early_draft_exit_sets(text: str) -> list[tuple[int, ...]]:
    """``"none/9/9,15"`` -> ``[(), (9,), (9, 15)]``: the command-line form of ``early_draft_exit_sets``."""
    return [() if part.strip().lower() in ("", "none") else tuple(parse_ints(part)) for part in text.split("/")]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every decoding command shares: the checkpoint, the data, the thread count and the outputs."""
    parser.add_argument(
        "--model_name_or_path", default=str(DEFAULT_MODEL), help="HF folder (default: SoFT GSM8K run)."
    )
    add_data_argument(parser, role="; prompts come from its held-out split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU).")
    parser.add_argument("--output", default=None, help="Also write the markdown report to this file.")


def add_decode_method_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--dynamic_rules``, ``--draft_stop_thresholds`` and ``--early_draft_exits`` to ``parser``."""
    parser.add_argument(
        "--dynamic_rules",
        default="exact",
        help="Dynamic exit rules, comma-separated: exact (full-head confidence) and/or subset (exit_on_subset=True: "
        "decided on the vocabulary subset alone; approximate, faster).",
    )
    parser.add_argument(
        "--draft_stop_thresholds",
        default="none,0.5",
        help="draft_stop_threshold values to run each draft exit with, comma-separated; 'none': no confidence stop "
        "(default: without a stop and with the recommended 0.5).",
    )
    parser.add_argument(
        "--early_draft_exits",
        default="none",
        help="early_draft_exits settings, '/'-separated (e.g. 'none/9/9,15'); used with a draft stop threshold.",
    )


def decode_method_options(args: argparse.Namespace) -> dict:
    """The ``build_methods`` keyword arguments the flags of [`add_decode_method_flags`] stand for."""
    return {
        "dynamic_rules": [rule for rule in args.dynamic_rules.split(",") if rule],
        "draft_stop_thresholds": parse_draft_stop_thresholds(args.draft_stop_thresholds),
        "early_draft_exit_sets": parse_early_draft_exit_sets(args.early_draft_exits),
    }
