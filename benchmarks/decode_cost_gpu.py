"""Decoding mechanics on a random-init model of real shape: a greedy token against one all-drafts-accepted cycle of
self-speculative decoding at a few draft exits, i.e. the first table of benchmarks/speculative_ceiling.py on a GPU.

    python benchmarks/decode_cost_gpu.py --shape llama3.2-1b --draft_exits 4,8,12 --max_draft 4    # one H200
    python benchmarks/decode_cost_gpu.py --shape tiny --device cpu --draft_exits 2,4 --max_draft 2 --rounds 2

A cycle of g drafts accepted in full yields g + 1 tokens, so (g + 1) x (greedy token) / (cycle) bounds the speed-up
at that exit and length whatever the weights are: random weights measure the mechanics (kernel launches, cache
handling, the head), which is what a GPU changes. The cycles are `speculative_ceiling.cycle_timer`'s, timed here with
a device synchronisation around each; a greedy token is timed through `generate` (64 tokens minus 1, synchronised).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_harness import parse_ints  # noqa: E402
from speculative_ceiling import all_accepted_table, cycle_timer, draft_token_fn  # noqa: E402

from soft_peft.inference import DecoderStack  # noqa: E402

SHAPES = {
    # meta-llama/Llama-3.2-1B config.json
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1001,
    ),
}  # fmt: skip


def synchronized(function, device: str):
    """``function``'s wall time including the device work it queued (CUDA kernels run asynchronously)."""

    def timed(*args) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3.2-1b", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--draft_exits", type=parse_ints, default=[4, 8, 12])
    parser.add_argument("--max_draft", type=int, default=4)
    parser.add_argument("--context", type=int, default=160, help="cached positions before each timed cycle")
    parser.add_argument("--new_tokens", type=int, default=64, help="greedy tokens per `generate` timing")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds; each times every entry once")
    parser.add_argument("--output", help="also write the markdown table here")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[args.shape], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    stack = DecoderStack(model)
    bad = [k for k in args.draft_exits if not 1 <= k < stack.num_layers]
    if bad:
        raise SystemExit(f"--draft_exits must lie in 1..{stack.num_layers - 1}, got {bad}")

    with torch.inference_mode():
        filler = torch.randint(3, config.vocab_size, (1, args.context), device=args.device)
        cache = stack.new_cache()
        inputs = stack.step_inputs(None, 0, args.context, 1)
        stack.run_layers(stack.embed(filler, inputs), 1, stack.num_layers, inputs, cache)
        cycle = synchronized(cycle_timer(stack, cache, args.context, draft_token_fn(stack)), args.device)
        generate = synchronized(
            lambda count: model.generate(filler, do_sample=False, max_new_tokens=count, min_new_tokens=count),
            args.device,
        )
        entries = [(None,)] + [(k, g, False) for k in args.draft_exits for g in range(1, args.max_draft + 1)]
        samples, greedy = {entry: [] for entry in entries}, []
        for round_index in range(args.rounds + 1):  # round 0 warms up (kernels, autotuning, allocator)
            for entry in entries:
                seconds = cycle(*entry)
                if round_index:
                    samples[entry].append(seconds)
            token = (generate(args.new_tokens + 1) - generate(1)) / args.new_tokens
            if round_index:
                greedy.append(token)
    seconds = {entry: statistics.median(values) for entry, values in samples.items()}
    greedy_token = statistics.median(greedy)

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    lines = [
        f"Random-init `{args.shape}` ({stack.num_layers} layers, vocab {config.vocab_size}), {args.dtype}, "
        f"{device_name}, torch {torch.__version__}; cycles at {args.context} cached positions, full draft head, "
        f"median of {args.rounds} interleaved rounds.",
        f"One greedy token: {greedy_token * 1e3:.2f} ms with `generate`, {seconds[(None,)] * 1e3:.2f} ms as one step "
        "of the layer-wise stack.",
        "",
        *all_accepted_table(seconds, greedy_token, args.draft_exits, args.max_draft, ms_digits=2),
    ]
    report = "\n".join(lines)
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
