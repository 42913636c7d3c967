"""`python -m benchmarks.serve_vllm`: an extracted SoFT exit as the draft model of vLLM's engine, on any device vLLM
runs on (its CPU build included).

The full model decodes the same prompts greedily twice in vLLM's offline `LLM`: without speculation, and with the exit
written by `soft-peft extract` as a separate draft model, configured by `soft_peft.serving.vllm_speculative_config`
(what `soft-peft extract` prints). It writes, for each, the generated token ids, the decoding wall time and tokens/s,
and, with the draft, vLLM's own speculative-decoding counters (drafts, drafted and accepted tokens, accepted tokens
per draft position). Greedy decoding with a draft must give the tokens greedy decoding gives without one.

Run it with a Python that has vLLM, from the repository root (``PYTHONPATH=.``): it imports vLLM and, of this
repository, only `soft_peft.serving` and `soft_peft.prompt_templates`, which need nothing but the standard library,
because vLLM pins a transformers older than soft-peft's floor and lives in a virtual environment of its own
(CONTRIBUTING.md, "vLLM engine test (CPU)"). On a CPU, vLLM also reads ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache)
and ``VLLM_CPU_OMP_THREADS_BIND`` (the cores its worker binds to).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from soft_peft.prompt_templates import format_prompt
from soft_peft.serving import vllm_speculative_config

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "data" / "gsm8k" / "train_300.jsonl"
# vLLM's speculative-decoding counters (vllm.v1.metrics), read back through `LLM.get_metrics()`
SPEC_DECODE_COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
SPEC_DECODE_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's flags."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The full model's folder (or Hub id).")
    parser.add_argument("--draft", required=True, help="The extracted exit's folder (or Hub id): the draft model.")
    parser.add_argument("--num_speculative_tokens", type=int, default=4, help="Tokens the draft proposes per step.")
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--data", default=str(GSM8K), help="JSONL with a `question` column (GSM8K's).")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_model_len", type=int, default=512)
    parser.add_argument(
        "--gpu_memory_utilization",
        type=float,
        default=0.2,
        help="vLLM's share of the accelerator's memory (of the machine's RAM on its CPU backend, which refuses its "
        "default 0.92 when that much is not free).",
    )
    parser.add_argument("--json", required=True, help="Write the results here.")
    return parser.parse_args(argv)


def gsm8k_prompts(data: str, count: int) -> list[str]:
    """The first ``count`` questions of ``data`` as soft-peft's GSM8K training formats its prompts."""
    with open(data) as handle:
        questions = [json.loads(line)["question"] for line in handle if line.strip()][:count]
    if len(questions) < count:
        raise SystemExit(f"--num_prompts {count}: {data} holds only {len(questions)} questions.")
    return [format_prompt(question, "gsm8k") for question in questions]


def spec_decode_metrics(metrics) -> dict:
    """vLLM's speculative-decoding counters from ``LLM.get_metrics()``, summed over their label sets.

    Returns:
        ``num_drafts``, ``num_draft_tokens``, ``num_accepted_tokens`` and ``accepted_per_position`` (tokens accepted
        at draft position 0, 1, ...), all counted since the engine started.
    """
    found: dict = {"accepted_per_position": []}
    for metric in metrics:
        if metric.name in SPEC_DECODE_COUNTERS:
            key = SPEC_DECODE_COUNTERS[metric.name]
            found[key] = found.get(key, 0) + int(metric.value)
        elif metric.name == SPEC_DECODE_PER_POSITION:
            summed = found["accepted_per_position"]
            summed.extend([0] * (len(metric.values) - len(summed)))
            for position, value in enumerate(metric.values):
                summed[position] += int(value)
    missing = sorted(set(SPEC_DECODE_COUNTERS.values()) - set(found))
    if missing:  # a renamed counter must fail the run, not read as zero
        names = sorted({metric.name for metric in metrics})
        raise RuntimeError(f"vLLM reported no {', '.join(missing)}; its metrics: {names}")
    return found


def run_engine(args: argparse.Namespace, prompts: list[str], speculative_config: dict | None) -> dict:
    """Greedy decoding of ``prompts`` in a fresh vLLM engine on ``args.model``, with ``speculative_config`` or none.

    Returns:
        ``prompt_token_ids``, ``token_ids`` (generated, per prompt), ``startup_seconds``, ``seconds`` (the timed
        ``generate`` call, after a short warm-up), ``tokens``, ``tokens_per_second`` and, with a draft,
        ``spec_decode`` (`spec_decode_metrics` of the timed call alone).
    """
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        speculative_config=speculative_config,
        disable_log_stats=False,  # keeps the counters `get_metrics` reads
        seed=0,
    )
    startup = time.perf_counter() - start
    # temperature 0 is greedy; EOS still stops a sequence, as it stops `generate`
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up, not timed
    before = spec_decode_metrics(llm.get_metrics()) if speculative_config else None
    start = time.perf_counter()
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    seconds = time.perf_counter() - start
    token_ids = [list(output.outputs[0].token_ids) for output in outputs]
    tokens = sum(map(len, token_ids))
    result = {
        "prompt_token_ids": [list(output.prompt_token_ids) for output in outputs],
        "token_ids": token_ids,
        "startup_seconds": round(startup, 2),
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2),
    }
    if speculative_config:
        result["spec_decode"] = counters_since(before, spec_decode_metrics(llm.get_metrics()))
    del llm  # shuts its engine down before the next one starts
    gc.collect()
    return result


def counters_since(before: dict, after: dict) -> dict:
    """The speculative-decoding counters accumulated between two `spec_decode_metrics` readings."""
    since = {key: after[key] - before[key] for key in SPEC_DECODE_COUNTERS.values()}
    per_before = before["accepted_per_position"]
    since["accepted_per_position"] = [
        count - (per_before[i] if i < len(per_before) else 0) for i, count in enumerate(after["accepted_per_position"])
    ]
    if since["num_draft_tokens"]:
        since["acceptance_rate"] = round(since["num_accepted_tokens"] / since["num_draft_tokens"], 4)
        since["accepted_per_draft"] = round(since["num_accepted_tokens"] / since["num_drafts"], 4)
    return since


def report(results: dict) -> str:
    """A Markdown summary of `main`'s results."""
    greedy, draft = results["greedy"], results["draft_model"]
    spec = draft["spec_decode"]
    identical = sum(a == b for a, b in zip(greedy["token_ids"], draft["token_ids"], strict=True))
    lines = [
        f"vLLM {results['vllm']}, {results['num_prompts']} prompts, up to {results['max_new_tokens']} new tokens, "
        f"greedy; draft: {results['speculative_config']}",
        "",
        "| run | tokens | seconds | tokens/s | engine start (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, run in (("no speculation", greedy), ("exit as draft model", draft)):
        lines.append(
            f"| {name} | {run['tokens']} | {run['seconds']} | {run['tokens_per_second']} | {run['startup_seconds']} |"
        )
    lines += [
        "",
        f"Sequences identical with and without the draft: {identical}/{len(greedy['token_ids'])}",
        f"Drafts {spec['num_drafts']}, drafted tokens {spec['num_draft_tokens']}, accepted "
        f"{spec['num_accepted_tokens']} (rate {spec.get('acceptance_rate', 'n/a')}, "
        f"{spec.get('accepted_per_draft', 'n/a')} per draft); accepted per position {spec['accepted_per_position']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both decodings and write their results to ``--json``; prints the summary."""
    import vllm

    args = parse_args(argv)
    prompts = gsm8k_prompts(args.data, args.num_prompts)
    config = vllm_speculative_config(args.draft, args.num_speculative_tokens)
    results = {
        "vllm": vllm.__version__,
        "model": args.model,
        "draft": args.draft,
        "speculative_config": config,
        "num_prompts": args.num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "greedy": run_engine(args, prompts, None),
        "draft_model": run_engine(args, prompts, config),
    }
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module: run only as the script
    sys.exit(main())
