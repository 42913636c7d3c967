"""Training cost of SoFT against TRL's SFTTrainer, measured side by side: median step time and peak memory of each
trainer, their ratios to SFT, and the FLOP model's prediction beside them.

    # CPU: a real model on GSM8K batches (batch 4, max_length 256), 1 warm-up + 3 measured steps per mode
    python -m benchmarks.train_cost trainers --model_name_or_path "$(python tools/get_smollm2.py)" --steps 3
    # ... and the quality controls beside SFT, every mode 3 times in turn (medians over the rounds)
    python -m benchmarks.train_cost trainers --model_name_or_path ... --modes sft soft --rounds 3 \\
        --variant last_half="--exit_loss_weights last:0.5" --variant head_last="--exit_head_grad last"
    # GPU: random-init models of real shape (no weights needed); the batch fills the GPU
    python -m benchmarks.train_cost trainers --shapes llama3-8b,llama2-13b --modes sft soft --steps 2
    python -m benchmarks.train_cost trainers --shapes tiny --device cpu --steps 1 --max_length 64   # CPU dry run
    # Which chunked head kernel the exit loss should use on this machine
    python -m benchmarks.train_cost head-kernel --repeats 2

Modes: `sft` (TRL's SFTTrainer), `soft_last` (SoFTTrainer with the last exit only: SFT's loss through SoFT's kernel),
`soft` (the default 8 exits), `naive` (8 exits with every exit's full logits stacked), and `--variant NAME="FLAGS"`
(SoFT with those SoFTConfig flags). Each mode runs in its own process, so its peak memory is its own: peak RSS on a
CPU, `torch.cuda.max_memory_allocated` on a GPU. A real model trains on GSM8K prompt-completion rows; a `--shapes`
model (bf16, as the recipes load it) on fixed-length rows whose last `--labelled` share is the completion. Gradient
checkpointing is on (TRL's default), bf16 autocast unless `--fp32`. With `--batch_size 0` on a GPU the batch fills
`--fill` of its memory after the model states; an out-of-memory first mode halves it once.

The FLOP model (`step_flops`): 8 FLOPs per non-embedding parameter per token with checkpointing (forward, recomputed
forward, backward) plus 8 H V per scored head position. Targets (issue 15): SoFT's peak memory <= 1.05x SFT's, and
SoFT's time ratio to SFT <= 1.10x the FLOP model's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    SHAPES,
    add_data_argument,
    gsm8k_config,
    parameter_count,
    parse_variant,
    peak_rss_gb,
    portable,
    print_and_write,
    random_model,
    synchronize,
)

MODES = ("sft", "soft_last", "soft", "naive")
# Bytes per trained parameter on a GPU: bf16 weight + bf16 gradient + two bf16 AdamW moments (torch keeps the dtype)
STATE_BYTES = 8
OUT_OF_MEMORY = 3  # a child's exit code when its batch did not fit


def step_flops(run: dict, scored_positions: int) -> float:
    """FLOP model of one training step: 8 FLOPs per non-embedding parameter per token (forward, recomputed forward
    and backward with checkpointing) plus 8 * H * V per scored head position (chunked head recomputed in backward)."""
    backbone = 8 * (run["params"] - run["embedding_params"]) * run["tokens"]
    return backbone + 8 * run["hidden"] * run["vocab"] * scored_positions


def scored_positions(run: dict) -> int:
    """Head positions a mode scores: every exit's labelled ones; TRL's SFT head without Triton (on a CPU) scores every
    position of the batch."""
    if run["mode"] == "sft" and run["device"] == "cpu":
        return run["positions"]
    return run["labelled"] * len(run["exits"])


def activation_bytes_per_token(shape: dict, seq: int) -> float:
    """Checkpointed bf16 layer inputs plus one layer recomputed in full (recipes/memory_estimate.py's model)."""
    hidden, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    return layers * hidden * 2 + 34 * hidden + 5 * heads * seq


def fill_batch(shape: str, seq: int, fill: float) -> int:
    """Rows per batch that use ``fill`` of the GPU's memory after the model states."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    free_for_activations = fill * total - STATE_BYTES * parameter_count(shape)
    if free_for_activations <= 0:
        raise SystemExit(f"the model states alone exceed {fill:.0%} of the GPU's {total / 1e9:.0f} GB")
    return max(1, int(free_for_activations / (activation_bytes_per_token(SHAPES[shape], seq) * seq)))


def _word_tokenizer():
    """A four-token tokenizer: synthetic rows are pre-tokenized, TRL only needs its pad and EOS tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def gsm8k_like_rows(count: int, seq: int, labelled: float, vocab: int, seed: int = 0):
    """Pre-tokenized rows of ``seq`` random tokens whose last ``labelled`` share is the completion (trained)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    completion = round(seq * labelled)
    ids = torch.randint(4, vocab, (count, seq), generator=generator).tolist()
    mask = [[0] * (seq - completion) + [1] * completion] * count
    return Dataset.from_dict({"input_ids": ids, "completion_mask": mask})


def _naive_trainer_class():
    """A SoFTTrainer whose loss builds every exit's full logits and stacks them: the obvious implementation."""
    import torch
    import torch.nn.functional as F

    from soft_peft import SoFTTrainer
    from soft_peft.exit_head import find_exit_head
    from soft_peft.model_layout import backbone_outputs

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
            return F.cross_entropy(logits[:, :, :-1].flatten(0, 2).float(), targets.flatten(), ignore_index=-100)

    return NaiveStackedTrainer


def _soft_config_from_flags(common: dict, flags: str):
    """``SoFTConfig(**common)`` with ``flags`` (``"--exit_loss_weights last:0.5 ..."``) parsed as TrlParser would."""
    from transformers import HfArgumentParser

    from soft_peft import SoFTConfig

    argv = [part for key, value in common.items() for part in (f"--{key}", str(value))]
    (config,) = HfArgumentParser(SoFTConfig).parse_args_into_dataclasses(args=argv + shlex.split(flags))
    return config


def _trainer_and_config(mode: str, flags: str, common: dict, depth: int):
    """The trainer class and its config for ``mode`` (with a variant's SoFTConfig ``flags``)."""
    from trl import SFTConfig, SFTTrainer

    from soft_peft import SoFTConfig, SoFTTrainer

    if mode == "sft":
        return SFTTrainer, SFTConfig(**common)
    if flags:
        return SoFTTrainer, _soft_config_from_flags(common, flags)
    # The paper's 8 exits by default; below 10 layers those collide, so the last 8 layers there
    exits = None if depth >= 10 else list(range(max(1, depth - 7), depth + 1))
    if mode == "soft_last":  # SFT's loss through SoFT's kernel: isolates the cost of the extra exits
        exits = [depth]
    trainer_class = _naive_trainer_class() if mode == "naive" else SoFTTrainer
    return trainer_class, SoFTConfig(**common, exit_layers=exits)


def _model_and_rows(args, batch: int):
    """The model, its tokenizer and ``batch * (steps + 1)`` training rows: GSM8K for a real model, synthetic rows
    for a shape."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = batch * (args.steps + 1)
    if args.shape:
        dtype = torch.float32 if args.fp32 else torch.bfloat16
        model = random_model(args.shape, args.device, dtype)
        labelled = gsm8k_like_rows(rows, args.max_length, args.labelled, model.config.vocab_size)
        return model, _word_tokenizer(), labelled
    from soft_peft.data import load_prompt_completion

    torch.manual_seed(0)
    dataset = load_prompt_completion(args.data, "gsm8k", config_name=gsm8k_config(args.data)).select(range(rows))
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).to(args.device)
    return model, AutoTokenizer.from_pretrained(args.model_name_or_path), dataset


def measure(args) -> dict:
    """Train ``args.steps`` + 1 warm-up steps of ``args.one`` in this process; its step times and peak memory."""
    import torch
    from transformers import TrainerCallback

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch = args.batch_size or (fill_batch(args.shape, args.max_length, args.fill) if args.device == "cuda" else 4)
    model, tokenizer, rows = _model_and_rows(args, batch)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="train_cost_"), max_steps=args.steps + 1,
        per_device_train_batch_size=batch, max_length=args.max_length, completion_only_loss=True,
        activation_checkpointing=True, learning_rate=1e-5, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=args.device == "cpu", seed=0, bf16=not args.fp32, dataloader_drop_last=True, disable_tqdm=True,
    )  # fmt: skip
    depth = model.config.num_hidden_layers
    trainer_class, config = _trainer_and_config(args.one, args.soft_flags, common, depth)
    step_times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            synchronize(args.device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            synchronize(args.device)
            step_times.append(time.perf_counter() - self.start)

    trainer = trainer_class(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer, callbacks=[StepTimer()]
    )
    first = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else peak_rss_gb()
    return {
        "mode": args.one, "device": args.device, "batch": batch, "median_step_s": statistics.median(step_times[1:]),
        "step_times": step_times, "peak_gb": peak, "tokens": int(first["attention_mask"].sum()),
        "positions": int(first["labels"][:, 1:].numel()), "labelled": int((first["labels"][:, 1:] != -100).sum()),
        "exits": list(getattr(trainer, "exit_layers", None) or [depth]), "hidden": model.config.hidden_size,
        "vocab": model.config.vocab_size, "params": sum(p.numel() for p in model.parameters()),
        "embedding_params": model.get_input_embeddings().weight.numel(),
    }  # fmt: skip


def _child_argv(args, mode: str, flags: str, batch: int) -> list[str]:
    """The command of one mode's own process."""
    source = ["--shapes", args.shape] if args.shape else ["--model_name_or_path", args.model_name_or_path]
    command = [sys.executable, "-m", "benchmarks.train_cost", "trainers", *source, "--one", mode]
    command += ["--data", args.data, "--steps", str(args.steps), "--device", args.device, "--fill", str(args.fill)]
    command += ["--batch_size", str(batch), "--max_length", str(args.max_length), "--labelled", str(args.labelled)]
    return command + (["--fp32"] if args.fp32 else []) + (["--soft_flags", flags] if flags else [])


def _run_child(args, name: str, mode: str, flags: str, batch: int) -> dict:
    """One mode in its own process: its result, or ``{"batch", "error"}`` when its batch did not fit in memory."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(_child_argv(args, mode, flags, batch), capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None or done.returncode not in (0, OUT_OF_MEMORY):
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"mode {name} failed (exit {done.returncode})")
    return json.loads(line[len("RESULT ") :])


def run_modes(args, runs: dict[str, tuple[str, str]]) -> dict[str, dict]:
    """Every run (name -> (mode, SoFTConfig flags)) ``args.rounds`` times in turn; per run, the first round's
    numbers with the median step time and peak memory over the rounds. The first run fixes the batch: it is halved
    once when it runs out of memory; a later run that does not fit that batch is recorded with its error."""
    per_round: dict[str, list[dict]] = {name: [] for name in runs}
    batch = args.batch_size
    for round_index in range(args.rounds):
        for name, (mode, flags) in runs.items():
            print(f"[{args.shape or 'model'}] {name} (round {round_index + 1}/{args.rounds}) ...", file=sys.stderr)
            result = _run_child(args, name, mode, flags, batch)
            first = not any(per_round.values())
            if "error" in result and first and result["batch"] > 1:
                batch = result["batch"] // 2
                print(f"[{args.shape}] {name}: out of memory, halving the batch to {batch}", file=sys.stderr)
                result = _run_child(args, name, mode, flags, batch)
            batch = result["batch"]
            per_round[name].append(result)
    results = {}
    for name, rounds in per_round.items():
        failed = next((r for r in rounds if "error" in r), None)
        if failed is not None:
            results[name] = failed
            continue
        results[name] = {**rounds[0], "median_step_s": statistics.median(r["median_step_s"] for r in rounds)}
        results[name]["peak_gb"] = statistics.median(r["peak_gb"] for r in rounds)
    return results


def report(results: dict[str, dict], title: str, variants: list[tuple[str, str]]) -> list[str]:
    """Markdown lines: one row per run with its ratios to SFT, then the FLOP model's verdicts."""
    sft = results.get("sft")
    lines = [
        f"{title}",
        "",
        "| mode | batch | median step (s) | peak memory (GB) | time / SFT | memory / SFT | FLOP model / SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['batch']} | {r['error']} | | | | |")
            continue
        ratios = ["–"] * 3
        if sft is not None and "error" not in sft:
            flops = step_flops(r, scored_positions(r)) / step_flops(sft, scored_positions(sft))
            ratios = [
                f"{value:.3f}x"
                for value in (r["median_step_s"] / sft["median_step_s"], r["peak_gb"] / sft["peak_gb"], flops)
            ]
        lines.append(
            f"| {name} | {r['batch']} | {r['median_step_s']:.2f} | {r['peak_gb']:.2f} | " + " | ".join(ratios) + " |"
        )
    lines += [f"\nVariant `{name}`: SoFT with `{flags}`." for name, flags in variants]
    return lines + _verdicts(results)


def _verdicts(results: dict[str, dict]) -> list[str]:
    """The batch, the cost of the extra exits against the FLOP bound, and SoFT against the targets."""
    soft, single, sft = results.get("soft"), results.get("soft_last"), results.get("sft")
    if soft is None or "error" in soft:
        return []
    lines = ["", f"Batch: {soft['tokens']} tokens, {soft['labelled']} labelled positions, exits {soft['exits']}."]
    if single is not None and "error" not in single:
        bound = step_flops(soft, scored_positions(soft)) / step_flops(single, scored_positions(single))
        measured = soft["median_step_s"] / single["median_step_s"]
        lines.append(
            f"Extra exits, SoFT / soft_last (same kernel, last exit only): FLOP bound {bound:.2f}x, measured "
            f"{measured:.2f}x; extra time {100 * (measured - 1):+.0f}% vs bound {100 * (bound - 1):+.0f}%."
        )
    if sft is not None and "error" not in sft:
        flop_ratio = step_flops(soft, scored_positions(soft)) / step_flops(sft, scored_positions(sft))
        time_ratio, memory_ratio = soft["median_step_s"] / sft["median_step_s"], soft["peak_gb"] / sft["peak_gb"]
        met = memory_ratio <= 1.05 and time_ratio <= 1.10 * flop_ratio
        lines.append(
            f"Targets (memory <= 1.05x SFT's, time <= 1.10x the FLOP ratio {flop_ratio:.3f}x): memory "
            f"{memory_ratio:.3f}x, time {time_ratio:.3f}x: {'met' if met else 'MISSED'}."
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """`trainers` (SoFT against SFTTrainer) and `head-kernel` (the chunked head kernels)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    trainers = commands.add_parser("trainers", help="SoFT against TRL's SFTTrainer: step time and peak memory.")
    source = trainers.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_name_or_path", help="A causal LM folder (SmolLM2-135M: tools/get_smollm2.py).")
    source.add_argument("--shapes", help=f"Random-init shapes, comma-separated, from {list(SHAPES)}.")
    add_data_argument(trainers, role=" (with --model_name_or_path)")
    trainers.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    trainers.add_argument(
        "--variant", type=lambda text: parse_variant(text, MODES), action="append", default=[],
        metavar='NAME="--flag value ..."', help="Also time SoFT with these SoFTConfig flags (repeatable).",
    )  # fmt: skip
    trainers.add_argument("--steps", type=int, default=3, help="Measured steps per mode (after one warm-up step).")
    trainers.add_argument("--rounds", type=int, default=1, help="Run every mode this many times, in turn.")
    trainers.add_argument("--batch_size", type=int, default=4, help="Rows per batch; 0: fill the GPU (--fill).")
    trainers.add_argument("--max_length", type=int, default=256, help="Tokens per row (GSM8K: median ~180).")
    trainers.add_argument("--labelled", type=float, default=0.68, help="Completion share of a --shapes row.")
    trainers.add_argument("--fill", type=float, default=0.75, help="Share of GPU memory a --batch_size 0 fills.")
    trainers.add_argument("--device", default=None, choices=["cuda", "cpu"], help="Default: cuda when available.")
    trainers.add_argument("--fp32", action="store_true", help="No bf16 (autocast, and the --shapes weights).")
    trainers.add_argument("--output", help="Also write the markdown report here.")
    trainers.add_argument("--json", help="Also write every run's numbers here.")
    trainers.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode in this process
    trainers.add_argument("--soft_flags", default="", help=argparse.SUPPRESS)  # internal: a variant's flags
    kernel = commands.add_parser("head-kernel", help="TRL's chunked head kernel against soft_peft.chunked_ce.")
    kernel.add_argument("--tokens", type=int, default=700, help="Labelled tokens per exit (GSM8K b4x256: ~700).")
    kernel.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's hidden size.")
    kernel.add_argument("--vocab", type=int, default=49152, help="SmolLM2-135M's vocabulary.")
    kernel.add_argument("--exits", type=int, default=8)
    kernel.add_argument("--repeats", type=int, default=3)
    kernel.add_argument("--one", help=argparse.SUPPRESS)  # internal: KERNEL:PRECISION in this process
    return parser


def _trainers(args) -> int:
    """The `trainers` command: every shape (or the model), every mode, one report."""
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = args.shapes if args.one else None
    if args.one:  # a child: one mode, one shape or model
        try:
            print("RESULT " + json.dumps(measure(args)), flush=True)
        except torch.OutOfMemoryError:
            print("RESULT " + json.dumps({"mode": args.one, "batch": args.batch_size, "error": "out of memory"}))
            return OUT_OF_MEMORY
        return 0
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    unknown = [name for name in (args.shapes or "").split(",") if name and name not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    if args.shapes is None and args.batch_size == 0:
        raise SystemExit("--batch_size 0 (fill the GPU) needs --shapes: a shape's memory is computed, not measured")
    runs = {mode: (mode, "") for mode in args.modes} | {name: ("soft", flags) for name, flags in args.variant}
    lines, everything = [], []
    for shape in args.shapes.split(",") if args.shapes else [None]:
        args.shape = shape
        results = run_modes(args, runs)
        precision = "fp32" if args.fp32 else "bf16"
        model = f"random-init `{shape}`" if shape else f"`{portable(args.model_name_or_path)}` on GSM8K"
        lines += report(results, f"### {model}, {args.device}, {precision}, {args.steps} steps", args.variant)
        lines.append("")
        everything += [{"shape": shape, "run": name, **result} for name, result in results.items()]
    print_and_write("\n".join(lines), args.output)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in everything))
    return 0 if all("error" not in r for r in everything) else 1


def main(argv: list[str] | None = None) -> int:
    """Run `trainers` or `head-kernel` (see the module's docstring)."""
    args = build_parser().parse_args(argv)
    if args.command == "trainers":
        return _trainers(args)
    from benchmarks.train_cost_kernel import head_kernel

    return head_kernel(args)


if __name__ == "__main__":
    sys.exit(main())
