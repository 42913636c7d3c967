"""`python -m benchmarks.decode_cost draft-model`: a SoFT exit as a draft model, three ways, side by side.

soft-peft's self-speculative decoding (one model, one KV cache shared by draft and verification) against transformers'
assisted generation with the exit written by `soft-peft extract` as `assistant_model` (a second model with its own KV
cache: what vLLM's `draft_model` and SGLang's STANDALONE run) and with `assistant_early_exit` (the same weights, a
separate draft pass and cache).

Speed, acceptance (accepted / drafted tokens) and exactness against greedy `generate` come from one process, the
methods interleaved prompt by prompt (batch 1: transformers' assisted generation decodes one sequence). Peak memory
is measured per method in a fresh process decoding one prompt: the RSS once the model (and the separate draft
model) is loaded and its weights touched by a short forward, and the peak RSS while decoding (the transient peak of
loading is reset first), so that what one method allocated cannot hide another's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers.generation import candidate_generator

from benchmarks.common import machine_line, parse_ints
from benchmarks.decode_harness import (
    DecodeMethod,
    add_model_arguments,
    build_methods,
    emit,
    gsm8k_benchmark_data,
    load_model,
    run_decode_benchmark,
)
from soft_peft import recorded_exit_layers
from soft_peft.cli import main as soft_peft_main
from soft_peft.model_layout import num_decoder_layers


def add_draft_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The `draft-model` command's flags."""
    add_model_arguments(parser)
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--draft_exits", type=parse_ints, default=None, help="Default: two recorded exits below L.")
    parser.add_argument("--num_draft_tokens", default="adaptive", help="soft-peft's drafts per cycle, or 'adaptive'.")
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    parser.add_argument("--memory_probe", default=None, help=argparse.SUPPRESS)  # internal: "MODE:EXIT:DRAFT_DIR"


@contextlib.contextmanager
def count_assisted_drafts(counters: dict):
    """Count transformers' drafted and accepted tokens (it reports neither): every candidate generator of assisted
    generation and `assistant_early_exit` drafts in `get_candidates` and learns its matches in
    `update_candidate_strategy`. Patched for the duration of one call only."""
    generator_class = candidate_generator.AssistedCandidateGenerator
    early_exit_class = candidate_generator.EarlyExitCandidateGenerator
    originals = {
        (generator_class, "get_candidates"): generator_class.get_candidates,
        (early_exit_class, "get_candidates"): early_exit_class.get_candidates,
        (generator_class, "update_candidate_strategy"): generator_class.update_candidate_strategy,
    }
    depth = {"inner": False}

    def counted_candidates(original):
        def get_candidates(self, input_ids, **kwargs):
            # The early-exit generator calls its parent's get_candidates: count the outer call only
            outer = not depth["inner"]
            depth["inner"] = True
            try:
                candidate_ids, logits = original(self, input_ids, **kwargs)
            finally:
                depth["inner"] = not outer
            if outer:
                counters["drafted"] = counters.get("drafted", 0) + candidate_ids.shape[1] - input_ids.shape[1]
            return candidate_ids, logits

        return get_candidates

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        counters["accepted"] = counters.get("accepted", 0) + int(num_matches)
        return originals[(generator_class, "update_candidate_strategy")](self, input_ids, scores, num_matches)

    try:
        generator_class.get_candidates = counted_candidates(originals[(generator_class, "get_candidates")])
        early_exit_class.get_candidates = counted_candidates(originals[(early_exit_class, "get_candidates")])
        generator_class.update_candidate_strategy = update_candidate_strategy
        yield counters
    finally:
        for (owner, name), function in originals.items():
            setattr(owner, name, function)


def extract_drafts(model_path: str, exits: list[int], folder: str) -> dict[int, str]:
    """Write each draft exit with `soft-peft extract`, as a user would; returns ``{exit: folder}``."""
    folders = {}
    for k in exits:
        folders[k] = os.path.join(folder, f"exit-{k}")
        argv = ["extract", "--model_name_or_path", model_path, "--num_layers", str(k), "--output_dir", folders[k]]
        with contextlib.redirect_stdout(sys.stderr):
            if soft_peft_main(argv) != 0:
                raise RuntimeError(f"soft-peft extract failed for exit {k}")
    return folders


def methods_for(model, drafts: dict, args: argparse.Namespace) -> list[DecodeMethod]:
    """Greedy, then per draft exit: self-speculative, `assistant_model=<extracted exit>`, `assistant_early_exit`."""
    draft_length = args.num_draft_tokens if args.num_draft_tokens == "adaptive" else int(args.num_draft_tokens)
    exits = sorted(drafts)
    harness = build_methods(
        model, args.max_new_tokens, exits, draft_length, None, [], exits,
        modes=["self-speculative", "assistant_early_exit"],
    )  # fmt: skip
    methods = [harness[0]]
    for k in exits:
        speculative = next(m for m in harness if m.mode == "self-speculative" and f"exit {k}," in m.setting)
        early = next(m for m in harness if m.mode == "assistant_early_exit" and m.setting == f"k={k}")

        def assisted(input_ids, attention_mask, draft=drafts[k]):
            with count_assisted_drafts({}) as counters:
                sequences = model.generate(
                    input_ids, attention_mask=attention_mask, assistant_model=draft, do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                )  # fmt: skip
            return sequences, counters

        def early_exit(input_ids, attention_mask, run=early.run):
            with count_assisted_drafts({}) as counters:
                sequences, _ = run(input_ids, attention_mask)
            return sequences, counters

        methods += [
            DecodeMethod("self-speculative", f"exit {k}, shared cache, {draft_length} drafts", speculative.run),
            DecodeMethod("assistant_model", f"extracted exit {k}, separate cache", assisted, batch_one_only=True),
            DecodeMethod("assistant_early_exit", f"exit {k}, separate cache", early_exit, batch_one_only=True),
        ]
    return methods


def default_draft_exits(depth: int, recorded: list[int] | None) -> list[int]:
    """The deepest trained exits at or below half and three quarters of the depth (any exit when none recorded)."""
    below = [k for k in (recorded or []) if k < depth] or list(range(1, depth))
    return sorted({max([k for k in below if k <= share * depth] or below[:1]) for share in (0.5, 0.75)})


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def memory_probe(args: argparse.Namespace) -> None:
    """In a fresh process: load the model (and the draft), decode one prompt with one method, print the peak RSS."""
    mode, k, draft_folder = args.memory_probe.split(":", 2)
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model_name_or_path)
    drafts = {int(k): None}
    if mode == "assistant_model":
        from transformers import AutoModelForCausalLM

        drafts[int(k)] = AutoModelForCausalLM.from_pretrained(draft_folder, dtype=model.dtype).eval()
    prompts, _, _ = gsm8k_benchmark_data(args.data, 1)
    method = next(m for m in methods_for(model, drafts, args) if m.mode == mode)
    input_ids = tokenizer(prompts[:1], return_tensors="pt").input_ids
    # A short forward of each model first: safetensors weights are memory-mapped and only count once touched
    with torch.no_grad():
        for warm in [model, *(d for d in drafts.values() if d is not None)]:
            warm(input_ids[:, :8])
    gc.collect()
    loaded = _status_mb("VmRSS")
    # Reset the peak to the current RSS (Linux clear_refs "5"), so the transient peak of loading is not counted
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    method.run(input_ids, None)
    print(json.dumps({"peak_mb": _status_mb("VmHWM"), "loaded_mb": loaded}))


def measure_memory(args: argparse.Namespace, mode: str, k: int, draft_folder: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.decode_cost", "draft-model", "--data", args.data]
    command += ["--model_name_or_path", args.model_name_or_path]
    command += ["--max_new_tokens", str(args.max_new_tokens), "--num_draft_tokens", args.num_draft_tokens]
    command += ["--threads", str(args.threads), "--memory_probe", f"{mode}:{k}:{draft_folder}"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _exit_of(method: DecodeMethod) -> int | None:
    return None if method.mode == "greedy" else int(method.setting.split("exit ")[1].split(",")[0])


def table_rows(methods: list[DecodeMethod], results, memory: dict, draft_mb: dict) -> list[dict]:
    """One dict per method: speed and ratio to greedy, acceptance, agreement with greedy, draft weights, peak RSS."""
    greedy = results[0]
    rows = []
    for method, result in zip(methods, results, strict=True):
        probe = memory.get(method.setting, memory["greedy"])
        pairs = zip(result.outputs, greedy.outputs, strict=True)
        same = sum(a == b for row, ref in pairs for a, b in zip(row, ref, strict=False))
        counters = result.counters
        k = _exit_of(method)
        rows.append(
            {
                "method": method.mode,
                "setting": method.setting,
                "tokens_per_second": result.tokens_per_second,
                "vs_greedy": result.tokens_per_second / greedy.tokens_per_second,
                "acceptance": counters["accepted"] / counters["drafted"] if counters.get("drafted") else None,
                "tokens_equal_greedy": same / max(sum(len(r) for r in greedy.outputs), 1),
                "draft_weights_mb": draft_mb[k] if method.mode == "assistant_model" else 0.0,
                "loaded_rss_mb": probe["loaded_mb"],
                "decode_extra_mb": probe["peak_mb"] - probe["loaded_mb"],
                "peak_rss_mb": probe["peak_mb"],
                "peak_vs_greedy_mb": probe["peak_mb"] - memory["greedy"]["peak_mb"],
            }
        )
    return rows


def _measure(args, model, tokenizer, path: str, exits: list[int]):
    """Extract the draft exits, decode every method interleaved, then probe each method's memory in its own process;
    ``(methods, results, memory, draft weights MB)``."""
    from transformers import AutoModelForCausalLM

    prompts, _, _ = gsm8k_benchmark_data(args.data, args.num_prompts)
    with tempfile.TemporaryDirectory() as folder:
        folders = extract_drafts(path, exits, folder)
        drafts = {k: AutoModelForCausalLM.from_pretrained(f, dtype=model.dtype).eval() for k, f in folders.items()}
        draft_mb = {k: sum(p.numel() * p.element_size() for p in d.parameters()) / 2**20 for k, d in drafts.items()}
        methods = methods_for(model, drafts, args)
        results = run_decode_benchmark(model, tokenizer, prompts, methods, batch_sizes=(1,))
        memory = {"greedy": measure_memory(args, "greedy", exits[0], "-")}
        for method in methods[1:]:
            k = _exit_of(method)
            memory[method.setting] = measure_memory(args, method.mode, k, folders[k])
    return methods, results, memory, draft_mb, len(prompts)


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | setting | tokens/s | x greedy | acceptance | tokens = greedy | draft weights (MB) "
        "| RSS loaded (MB) | decode peak above it (MB) | peak RSS (MB) | peak - greedy's (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['tokens_per_second']:.1f} | {row['vs_greedy']:.2f} "
            f"| {acceptance} | {row['tokens_equal_greedy']:.3f} | {row['draft_weights_mb']:.0f} "
            f"| {row['loaded_rss_mb']:.0f} | {row['decode_extra_mb']:.0f} | {row['peak_rss_mb']:.0f} "
            f"| {row['peak_vs_greedy_mb']:+.0f} |"
        )
    return lines


def draft_model(args: argparse.Namespace, command: str) -> int:
    """The `draft-model` command (or, with ``--memory_probe``, one method's memory in this process)."""
    if args.memory_probe:
        memory_probe(args)
        return 0
    torch.set_num_threads(args.threads)
    model, tokenizer, path = load_model(args.model_name_or_path)
    depth, recorded = num_decoder_layers(model), recorded_exit_layers(model)
    exits = args.draft_exits or default_draft_exits(depth, recorded)
    methods, results, memory, draft_mb, num_prompts = _measure(args, model, tokenizer, path, exits)
    rows = table_rows(methods, results, memory, draft_mb)
    header = [
        f"Model: `{path}` ({depth} layers, SoFT exits {recorded or 'not recorded: untrained'}), {model.dtype}.",
        f"Prompts: {num_prompts} GSM8K held-out, batch 1, max_new_tokens={args.max_new_tokens}, "
        f"torch threads={args.threads}. Drafts: {exits}, written by `soft-peft extract`.",
        machine_line(),
        f"Command: `{command.strip()}`",
        "",
    ]
    emit(header, "\n".join(_table(rows)), args.output)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command.strip(), "model": path, "rows": rows}, indent=1))
    return 0
