"""`python -m benchmarks.train_cost head-kernel`: which chunked head kernel the exit loss should use on this machine,
TRL's `ChunkedLogProbFunction` or `soft_peft.chunked_ce`, measured side by side (forward + backward of 8 exits at
SmolLM2-135M's head shape by default), each kernel and precision in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from benchmarks.common import peak_rss_gb


def head_kernel_run(kernel: str, precision: str, args) -> dict:
    """Forward + backward of ``args.exits`` exits through one chunked head kernel: median seconds and the peak RSS
    it added (run in its own process)."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from soft_peft.chunked_ce import chunked_cross_entropy

    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    states = [torch.randn(args.tokens, args.hidden, requires_grad=True) for _ in range(args.exits)]
    targets = torch.randint(0, args.vocab, (args.tokens,))
    base_gb, times = peak_rss_gb(), []
    for _ in range(args.repeats + 1):  # the first one warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            total = 0
            for h in states:
                if kernel == "trl":
                    scores = ("is_top1",)
                    logp = ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, 32768, None, 1.0, scores)[0]
                    total = total - logp.sum()
                else:
                    total = total + chunked_cross_entropy(h, weight, None, targets)[0].sum()
        total.backward()
        times.append(time.perf_counter() - start)
    extra_mb = (peak_rss_gb() - base_gb) * 1024
    return {
        "kernel": kernel,
        "median_s": statistics.median(times[1:]),
        "peak_extra_mb": extra_mb,
        "loss": float(total),
    }


def head_kernel_table(args) -> list[str]:
    """TRL's `ChunkedLogProbFunction` against `soft_peft.chunked_ce`, fp32 and bf16, each in its own process."""
    rows = ["| kernel | precision | fwd+bwd, all exits (s) | peak extra RSS (MB) | loss |", "|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        for kernel in ("trl", "soft_peft"):
            command = [sys.executable, "-m", "benchmarks.train_cost", "head-kernel", "--one", f"{kernel}:{precision}"]
            command += ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
            command += ["--exits", str(args.exits), "--repeats", str(args.repeats)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            r = json.loads(
                next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT ")
            )
            rows.append(
                f"| {kernel} | {precision} | {r['median_s']:.2f} | {r['peak_extra_mb']:.0f} | {r['loss']:.2f} |"
            )
    return rows


def head_kernel(args) -> int:
    """The `head-kernel` command: one kernel in this process (``--one KERNEL:PRECISION``), or the whole table."""
    if args.one:
        kernel, precision = args.one.split(":")
        print("RESULT " + json.dumps(head_kernel_run(kernel, precision, args)))
        return 0
    print("\n".join(head_kernel_table(args)))
    return 0
