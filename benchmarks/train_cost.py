"""Training cost of SoFT against TRL's SFTTrainer and a naive stacked-logits multi-exit loss, measured side by side.

    python benchmarks/train_overhead.py --model_name_or_path "$(python tools/get_smollm2.py)" --steps 4
    python benchmarks/train_overhead.py --model_name_or_path ... --modes sft soft --rounds 3 \
        --variant last_half="--exit_loss_weights last:0.5" --variant head_last="--exit_head_grad last"

Each mode runs in its own subprocess (so peak RSS is its own), on the same GSM8K prompt-completion batches (batch 4,
max_length 256, gradient checkpointing as TRL defaults). A `--variant NAME="FLAGS"` is SoFT with those `SoFTConfig`
flags (the quality controls). With `--rounds R` the modes run R times in turn and each mode's median step over the
rounds is reported, so a changing load on a shared machine falls on every mode alike. Prints a markdown table: median
step time, peak RSS, ratios to SFT, and the FLOP-model bound of the extra exits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = "openai/gsm8k"  # the Hub dataset (config "main"); --dataset FILE for a local JSONL with question/answer
MODES = ("sft", "soft_last", "soft", "naive")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def _naive_trainer_class():
    """A SoFTTrainer whose loss builds every exit's full logits and stacks them: the obvious implementation."""
    import torch
    import torch.nn.functional as F

    from soft_peft import SoFTTrainer
    from soft_peft.exit_head import backbone_outputs, find_exit_head

    class NaiveStackedTrainer(SoFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            head = find_exit_head(model)
            labels = inputs["labels"]
            outputs = backbone_outputs(
                model, input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            )
            logits = torch.stack(
                [head.logits_from_normed(head.exit_state(outputs, k)) for k in self.exit_layers]
            )  # (E, B, T, V)
            targets = labels[:, 1:].expand(len(self.exit_layers), -1, -1)  # (E, B, T-1)
            loss = F.cross_entropy(logits[:, :, :-1].flatten(0, 2).float(), targets.flatten(), ignore_index=-100)
            return loss

    return NaiveStackedTrainer


def run_mode(args) -> dict:
    """Train `args.steps` + 1 warm-up steps in this process; return timings and memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from soft_peft import SoFTConfig, SoFTTrainer
    from soft_peft.data import load_prompt_completion

    torch.manual_seed(0)
    config_name = "main" if args.dataset == GSM8K else None
    dataset = load_prompt_completion(str(args.dataset), "gsm8k", config_name=config_name)
    dataset = dataset.select(range(4 * (args.steps + 1)))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    rss_after_load = _peak_rss_gb()
    common = dict(
        output_dir="/tmp/soft_peft_bench",
        max_steps=args.steps + 1,
        per_device_train_batch_size=4,
        max_length=256,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        bf16=not args.fp32,
    )
    if args.mode == "sft":
        trainer_cls, config = SFTTrainer, SFTConfig(**common)
    elif args.soft_flags:  # a variant: SoFT with the user's SoFTConfig flags, parsed as the command line parses them
        trainer_cls, config = SoFTTrainer, _soft_config_from_flags(common, args.soft_flags)
    else:
        trainer_cls = _naive_trainer_class() if args.mode == "naive" else SoFTTrainer
        # soft_last: SoFT's kernel on the last layer only, i.e. SFT's loss; isolates the cost of the extra exits
        config = SoFTConfig(
            **common, exit_layers=[model.config.num_hidden_layers] if args.mode == "soft_last" else None
        )

    step_times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.start)

    trainer = trainer_cls(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()]
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    return {
        "mode": args.mode,
        "median_step_s": statistics.median(step_times[1:]),
        "step_times": step_times,
        "peak_rss_gb": _peak_rss_gb(),
        "rss_after_load_gb": rss_after_load,
        "tokens": int(batch["attention_mask"].sum()),
        "positions": int(batch["labels"][:, 1:].numel()),
        "labelled": labelled,
        "exit_layers": getattr(trainer, "exit_layers", None),
        "hidden": model.config.hidden_size,
        "vocab": model.config.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
        "embedding_params": model.get_input_embeddings().weight.numel(),
    }


def _soft_config_from_flags(common: dict, flags: str):
    """``SoFTConfig(**common)`` with ``flags`` (``"--exit_loss_weights last:0.5 ..."``) parsed as TrlParser would."""
    from transformers import HfArgumentParser

    from soft_peft import SoFTConfig

    argv = [part for key, value in common.items() for part in (f"--{key}", str(value))]
    (config,) = HfArgumentParser(SoFTConfig).parse_args_into_dataclasses(args=argv + shlex.split(flags))
    return config


def parse_variant(text: str) -> tuple[str, str]:
    """``'last_half=--exit_loss_weights last:0.5'`` -> ``("last_half", "--exit_loss_weights last:0.5")``."""
    name, separator, flags = text.partition("=")
    if not separator or not name.strip() or name.strip() in MODES or not flags.strip().startswith("--"):
        raise argparse.ArgumentTypeError(
            f'expected NAME="--flag value ..." with a new name (not one of {MODES}), got {text!r}'
        )
    return name.strip(), flags.strip()


def step_flops(run: dict, scored_positions: int) -> float:
    """FLOP model of one training step.

    Backbone (with gradient checkpointing): 8 FLOPs per non-embedding parameter per token (forward, recomputed
    forward, backward). Chunked head with recompute in backward: 8 * H * V per scored position.
    """
    backbone = 8 * (run["params"] - run["embedding_params"]) * run["tokens"]
    return backbone + 8 * run["hidden"] * run["vocab"] * scored_positions


def flop_bound(single: dict, soft: dict) -> float:
    """Predicted step-time ratio of SoFT (head once per exit on labelled positions) to a one-exit run of the same
    kernel, from [`step_flops`]."""
    return step_flops(soft, soft["labelled"] * len(soft["exit_layers"])) / step_flops(single, single["labelled"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Local folder of SmolLM2-135M (or any causal LM).")
    parser.add_argument("--dataset", default=GSM8K, help="GSM8K train: openai/gsm8k (default) or a local JSONL.")
    parser.add_argument("--steps", type=int, default=4, help="Measured steps per mode (after one warm-up step).")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--fp32", action="store_true", help="Disable TRL's default bf16 autocast.")
    parser.add_argument("--output", type=Path, help="Also write the markdown table here.")
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar='NAME="--flag value ..."',
        help="Also time SoFT with these SoFTConfig flags (repeatable).",
    )
    parser.add_argument("--rounds", type=int, default=1, help="Run every mode this many times, in turn.")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode in this process
    parser.add_argument("--soft_flags", default="", help=argparse.SUPPRESS)  # internal: a variant's flags
    args = parser.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return 0
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    # name -> (mode of the child process, SoFTConfig flags)
    runs = {mode: (mode, "") for mode in args.modes} | {name: ("soft", flags) for name, flags in args.variant}
    per_round: dict[str, list[dict]] = {name: [] for name in runs}
    for round_index in range(args.rounds):
        for name, (mode, flags) in runs.items():
            command = [sys.executable, __file__, "--mode", mode, "--model_name_or_path", args.model_name_or_path]
            command += ["--dataset", str(args.dataset), "--steps", str(args.steps)]
            command += (["--fp32"] if args.fp32 else []) + (["--soft_flags", flags] if flags else [])
            print(f"running {name} (round {round_index + 1}/{args.rounds}) ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
                raise SystemExit(f"mode {name} failed")
            per_round[name].append(json.loads(line[len("RESULT ") :]))
    results = {}
    for name, rounds in per_round.items():
        results[name] = {
            **rounds[0],
            "median_step_s": statistics.median(r["median_step_s"] for r in rounds),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in rounds),
        }

    sft = results.get("sft")
    rows = [
        f"| mode | median step (s){' over rounds' if args.rounds > 1 else ''} | peak RSS (GB) | time / SFT "
        "| peak RSS / SFT |",
        "|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        time_ratio = r["median_step_s"] / sft["median_step_s"] if sft else float("nan")
        mem_ratio = r["peak_rss_gb"] / sft["peak_rss_gb"] if sft else float("nan")
        rows.append(
            f"| {mode} | {r['median_step_s']:.2f} | {r['peak_rss_gb']:.2f} | {time_ratio:.2f}x | {mem_ratio:.2f}x |"
        )
    lines = rows + [f"\nVariant `{name}`: SoFT with `{flags}`." for name, flags in args.variant]
    if "soft" in results:
        soft = results["soft"]
        lines += [
            "",
            f"Batch: {soft['tokens']} tokens, {soft['labelled']} labelled positions, exits {soft['exit_layers']}.",
        ]
        if "soft_last" in results:
            single = results["soft_last"]
            bound = flop_bound(single, soft)
            measured = soft["median_step_s"] / single["median_step_s"]
            lines.append(
                f"Extra exits, SoFT / soft_last (same kernel, last exit only): FLOP bound {bound:.2f}x, measured "
                f"{measured:.2f}x; extra time {100 * (measured - 1):+.0f}% vs bound {100 * (bound - 1):+.0f}%."
            )
        if sft:
            # On CPU, TRL's SFT head scores every position (no Triton), SoFT only labelled ones
            bound = step_flops(soft, soft["labelled"] * len(soft["exit_layers"])) / step_flops(sft, sft["positions"])
            lines.append(f"FLOP-model ratio SoFT / SFTTrainer: {bound:.2f}x.")
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
