"""`python -m benchmarks.serve_vllm_grid`: vLLM's speed with SoFT exits as draft models, over draft exits, drafted
tokens per step (k) and batch sizes, against vLLM without speculation on the same prompts.

One engine without speculation, then one per (draft exit, k), each with the exit written by `soft-peft extract` as
its draft model (`soft_peft.serving.vllm_speculative_config`). Every engine decodes the same prompts greedily at each
batch size: at batch b the prompts go to `generate` b at a time, so b sequences are in flight (b = 1 is one request
at a time). Per engine and batch size it records tokens/s, whether every sequence equals the one decoded without
speculation, and vLLM's own speculative-decoding counters for that batch size alone (drafts, drafted and accepted
tokens, accepted tokens per draft position).

An engine start costs minutes on a CPU, so each finished engine is written to ``--json`` at once and a rerun skips
it: an interrupted grid resumes. Run it as `benchmarks.serve_vllm` is run, with a Python that has vLLM, from the
repository root (``PYTHONPATH=.``; CONTRIBUTING.md, "vLLM engine test (CPU)"), and `--markdown` for the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from benchmarks.serve_vllm import GSM8K, counters_since, gsm8k_prompts, spec_decode_metrics
from soft_peft.serving import vllm_speculative_config

NO_SPECULATION = "none"


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's flags."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_vllm_grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The full model's folder.")
    parser.add_argument(
        "--drafts", required=True, help="Comma-separated folders of exits written by `soft-peft extract`."
    )
    parser.add_argument(
        "--ks", type=_ints, default=[2, 4, 6], help="Tokens drafted per step (num_speculative_tokens)."
    )
    parser.add_argument("--batch_sizes", type=_ints, default=[1, 8], help="Sequences in flight.")
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--data", default=str(GSM8K), help="JSONL with a `question` column (GSM8K's).")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_model_len", type=int, default=512)
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.2, help="As in `benchmarks.serve_vllm`.")
    parser.add_argument("--json", required=True, help="Results, written after each engine; a rerun resumes it.")
    parser.add_argument("--markdown", default=None, help="Also write the table here.")
    args = parser.parse_args(argv)
    if any(args.num_prompts % batch for batch in args.batch_sizes):
        parser.error(f"--num_prompts {args.num_prompts} must be a multiple of every --batch_sizes {args.batch_sizes}.")
    return args


def exit_of(draft: str) -> int:
    """The layers an extracted exit keeps (its config's ``num_hidden_layers``)."""
    return int(json.loads((Path(draft) / "config.json").read_text())["num_hidden_layers"])


def measure(llm, prompts: list[str], batch: int, max_new_tokens: int, speculative: bool) -> dict:
    """Greedy decoding of ``prompts``, ``batch`` at a time, in a started engine ``llm``.

    Returns:
        ``token_ids`` (per prompt), ``seconds``, ``tokens``, ``tokens_per_second`` and, when ``speculative``, the
        ``spec_decode`` counters of these calls alone (`counters_since`).
    """
    from vllm import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    before = spec_decode_metrics(llm.get_metrics()) if speculative else None
    token_ids, start = [], time.perf_counter()
    for first in range(0, len(prompts), batch):
        outputs = llm.generate(prompts[first : first + batch], greedy, use_tqdm=False)
        token_ids += [list(output.outputs[0].token_ids) for output in outputs]
    seconds = time.perf_counter() - start
    tokens = sum(map(len, token_ids))
    result = {"token_ids": token_ids, "seconds": round(seconds, 3), "tokens": tokens}
    result["tokens_per_second"] = round(tokens / seconds, 2)
    if speculative:
        result["spec_decode"] = counters_since(before, spec_decode_metrics(llm.get_metrics()))
    return result


def run_engine(args: argparse.Namespace, prompts: list[str], speculative_config: dict | None) -> dict:
    """One engine on ``args.model`` (with ``speculative_config`` or none), measured at every batch size."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_seqs=max(args.batch_sizes),
        gpu_memory_utilization=args.gpu_memory_utilization,
        speculative_config=speculative_config,
        disable_log_stats=False,  # keeps the counters `get_metrics` reads
        seed=0,
    )
    startup = round(time.perf_counter() - start, 2)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up, not timed
    speculative = speculative_config is not None
    batches = {str(b): measure(llm, prompts, b, args.max_new_tokens, speculative) for b in args.batch_sizes}
    del llm  # shuts its engine down before the next one starts
    gc.collect()
    return {"speculative_config": speculative_config, "startup_seconds": startup, "batches": batches}


def grid_table(results: dict) -> str:
    """Markdown: one row per engine and batch size, speed against no speculation at the same batch size."""
    base = results["engines"].get(NO_SPECULATION)
    if base is None:
        return "No engine without speculation measured yet."
    lines = [
        "| draft exit | k | batch | tokens/s | × no speculation | acceptance | accepted / draft "
        "| accepted per position | identical |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for batch, run in base["batches"].items():
        lines.append(f"| none | – | {batch} | {run['tokens_per_second']} | 1.00 | – | – | – | – |")
    for name, engine in results["engines"].items():
        if name == NO_SPECULATION:
            continue
        layer, k = name.split(":")
        for batch, run in engine["batches"].items():
            spec, reference = run["spec_decode"], base["batches"][batch]
            same = sum(a == b for a, b in zip(run["token_ids"], reference["token_ids"], strict=True))
            speedup = run["tokens_per_second"] / reference["tokens_per_second"]
            lines.append(
                f"| {layer} | {k} | {batch} | {run['tokens_per_second']} | {speedup:.2f} | "
                f"{spec.get('acceptance_rate', '–')} | {spec.get('accepted_per_draft', '–')} | "
                f"{spec['accepted_per_position']} | {same}/{len(run['token_ids'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure every engine of the grid not yet in ``--json``; print (and write) the table."""
    import vllm

    args = parse_args(argv)
    drafts = [d.strip() for d in args.drafts.split(",") if d.strip()]
    prompts = gsm8k_prompts(args.data, args.num_prompts)
    output = Path(args.json)
    settings = {
        "vllm": vllm.__version__,
        "model": args.model,
        "num_prompts": args.num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "batch_sizes": args.batch_sizes,
    }
    results = json.loads(output.read_text()) if output.exists() else {**settings, "engines": {}}
    changed = {key: (results.get(key), value) for key, value in settings.items() if results.get(key) != value}
    if changed:
        raise SystemExit(f"{output} was measured with other settings {changed}: write to another --json.")
    plan = {NO_SPECULATION: None}
    for draft in drafts:
        for k in args.ks:
            plan[f"{exit_of(draft)}:{k}"] = vllm_speculative_config(draft, k)
    for number, (name, config) in enumerate(plan.items(), 1):
        if name in results["engines"]:
            print(f"[grid] {number}/{len(plan)} {name}: measured, skipped", flush=True)
            continue
        print(f"[grid] {number}/{len(plan)} {name}: starting the engine", flush=True)
        results["engines"][name] = run_engine(args, prompts, config)
        output.write_text(json.dumps(results, indent=1) + "\n")  # after each engine: a rerun resumes here
    table = grid_table(results)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module: run only as the script
    sys.exit(main())
