"""Which chunked head kernel the exit loss should use on this machine: TRL's `ChunkedLogProbFunction` or
`soft_peft.chunked_ce`, measured side by side (forward + backward of 8 exits, SmolLM2-135M head shapes).

    python benchmarks/head_kernel.py [--tokens 700] [--repeats 3]

Each kernel runs in its own subprocess so that its peak RSS is its own. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run(kernel: str, tokens: int, hidden: int, vocab: int, exits: int, repeats: int, bf16: bool) -> dict:
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from soft_peft.chunked_ce import chunked_cross_entropy

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    states = [torch.randn(tokens, hidden, requires_grad=True) for _ in range(exits)]
    targets = torch.randint(0, vocab, (tokens,))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total = 0
            for h in states:
                if kernel == "trl":
                    logp = ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, 32768, None, 1.0, ("is_top1",))[
                        0
                    ]
                    total = total - logp.sum()
                else:
                    total = total + chunked_cross_entropy(h, weight, None, targets)[0].sum()
        total.backward()
        times.append(time.perf_counter() - start)
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {
        "kernel": kernel,
        "median_s": statistics.median(times[1:]),
        "peak_extra_mb": extra_mb,
        "loss": float(total),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=700, help="Labelled tokens per exit (GSM8K b4x256: ~700).")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--exits", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.tokens, args.hidden, args.vocab, args.exits, args.repeats)
    if args.one:
        kernel, precision = args.one.split(":")
        print("RESULT " + json.dumps(run(kernel, *shape, bf16=precision == "bf16")))
        return 0
    rows = ["| kernel | precision | fwd+bwd, 8 exits (s) | peak extra RSS (MB) | loss |", "|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        for kernel in ("trl", "soft_peft"):
            command = [sys.executable, __file__, "--one", f"{kernel}:{precision}", "--tokens", str(args.tokens)]
            command += ["--hidden", str(args.hidden), "--vocab", str(args.vocab), "--exits", str(args.exits)]
            command += ["--repeats", str(args.repeats)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            rows.append(
                f"| {kernel} | {precision} | {r['median_s']:.2f} | {r['peak_extra_mb']:.0f} | {r['loss']:.2f} |"
            )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
