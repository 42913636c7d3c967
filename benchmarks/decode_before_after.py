"""Decoding speed of this tree's decoders against an earlier revision's, side by side in one run.

Runs `decode_speed.py`'s run (same flags, same defaults) with both implementations of `self_speculative_generate` and
`dynamic_generate` on the same model instance, interleaved batch by batch, and prints for every setting the ratio
after / before of tokens per second and whether both produced the same tokens. The earlier revision's `soft_peft`
package is extracted with `git archive` and imported under another name, so nothing is installed or checked out.

    python benchmarks/decode_before_after.py                      # before = the commit before the decoding redesign
    python benchmarks/decode_before_after.py --before v0.1.0 --model_name_or_path runs/soft --num_prompts 8

Greedy `generate` and `assistant_early_exit` are transformers' code in both trees, so they run once, as references.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from decode_harness import build_methods, emit, format_table, run_decode_benchmark
from decode_speed import parse_args as parse_decode_speed_args
from decode_speed import prepare_run

ROOT = Path(__file__).resolve().parents[1]
# The last commit before the decoders were rebuilt around one decoding core (issue 14)
DEFAULT_BEFORE = "0a6b26d^"
OUR_MODES = ("self-speculative", "dynamic")


def import_revision(revision: str, alias: str = "soft_peft_before"):
    """Import ``soft_peft`` as it was at git ``revision``, as the package ``alias`` (its imports are relative)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "soft_peft"], capture_output=True)
    except OSError as error:
        raise SystemExit(f"decode_before_after.py: needs git to extract {revision}: {error}") from None
    if archive.returncode != 0:
        raise SystemExit(f"decode_before_after.py: git archive {revision}: {archive.stderr.decode().strip()}")
    folder = Path(tempfile.mkdtemp(prefix=f"{alias}_"))
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "soft_peft").rename(folder / alias)
    sys.path.insert(0, str(folder))
    return importlib.import_module(alias)


def _before_methods(package_alias: str, model, method_args: tuple, method_kwargs: dict) -> list:
    """The earlier revision's decoders with the same settings, built by that revision's own harness while it was in
    the library, else by today's harness driving that revision's decoders."""
    try:
        old_build = importlib.import_module(f"{package_alias}.inference.benchmark").build_methods
    except ImportError:  # a revision after the harness left the library
        old_decoders = importlib.import_module(f"{package_alias}.inference")
        old_build = functools.partial(build_methods, decoders=old_decoders)
    methods = old_build(model, *method_args, **method_kwargs)
    return [m for m in methods if m.mode in OUR_MODES]


def ratio_table(results, before_label: str) -> str:
    """One row per setting and batch size: tokens/s after and before, their ratio, and whether the tokens agree."""
    lines = [
        f"| batch | mode | setting | tokens/s after | tokens/s {before_label} | after / before | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    before = {
        (r.batch_size, r.mode.removeprefix("before "), r.setting): r for r in results if r.mode.startswith("before ")
    }
    ratios = []
    for result in results:
        old = before.get((result.batch_size, result.mode, result.setting))
        if old is None:
            continue
        ratio = result.tokens_per_second / old.tokens_per_second
        ratios.append(ratio)
        lines.append(
            f"| {result.batch_size} | {result.mode} | {result.setting} | {result.tokens_per_second:.1f} "
            f"| {old.tokens_per_second:.1f} | {ratio:.3f} | {'yes' if result.outputs == old.outputs else 'NO'} |"
        )
    if ratios:
        geometric_mean = torch.tensor(ratios).log().mean().exp().item()
        lines.append(f"\nGeometric mean of after / before over {len(ratios)} settings: **{geometric_mean:.3f}**.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--before", default=DEFAULT_BEFORE, help="Git revision to compare with.")
    known, rest = pre.parse_known_args(argv)
    args = parse_decode_speed_args(rest)
    before_alias = "soft_peft_before"
    import_revision(known.before, before_alias)
    run = prepare_run(args)

    after = build_methods(run.model, *run.method_args, **run.method_kwargs)
    before = _before_methods(before_alias, run.model, run.method_args, run.method_kwargs)
    for method in before:
        method.mode = f"before {method.mode}"
    # Interleaved: each of our settings is timed right before its earlier implementation, batch by batch
    by_setting = {(m.mode.removeprefix("before "), m.setting): m for m in before}
    methods = []
    for method in after:
        methods.append(method)
        if (method.mode, method.setting) in by_setting:
            methods.append(by_setting.pop((method.mode, method.setting)))
    methods.extend(by_setting.values())  # settings only the earlier revision has (none expected)
    results = run_decode_benchmark(run.model, run.tokenizer, run.prompts, methods, args.batch_sizes)

    command = "python benchmarks/decode_before_after.py " + " ".join(argv)
    header = run.header(args, command)
    header[-1:-1] = [f"Before: `{known.before}`; after: this tree.", "", ratio_table(results, "before"), "", "All:"]
    emit(header, format_table(results, run.tokenizer, run.references), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
