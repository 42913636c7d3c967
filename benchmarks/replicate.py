"""End-to-end SoFT-vs-SFT replication on SmolLM2-135M-Instruct and GSM8K (the study behind docs/results.md).

Steps (each can be run alone; `all` runs them in order):

    python benchmarks/replicate.py train                 # SoFT first, then SFT; one subprocess per model
    python benchmarks/replicate.py eval                  # per-exit evaluation of base, SFT and SoFT (held-out rows)
    python benchmarks/replicate.py report                # writes docs/results.md and docs/*.png from the eval outputs
    python benchmarks/replicate.py all                   # the documented run (~1.5 h on a shared 2-core CPU)

A smoke run must not overwrite the real checkpoints and docs: `SOFT_PEFT_RUNS_DIR=/tmp/smoke python
benchmarks/replicate.py train --max_steps 2` then `eval --eval_samples 2 --generate_samples 1 --max_new_tokens 4`
(`report` always writes docs/results.md). Defaults: 20 steps x batch 4 x max_length 256, lr 2e-4 (cosine, 1 warm-up
step), seed 0, fp32, no gradient checkpointing; eval on the first 32 held-out rows, generation on 2 questions.

Setup: GSM8K train (`openai/gsm8k` from the Hub, or `--data FILE`, 7473 rows) as prompt-completion, split with
`held_out_split(dataset, test_size=200, seed=0)`: 7273 training rows, 200 held out. SFT (TRL `SFTTrainer`) and SoFT
(`SoFTTrainer`, default 8 exits 9,12,...,30) share data, steps, hyper-parameters and seed. Checkpoints (plain HF
folders with the tokenizer) and a `train_stats.json` (wall time, peak RSS, loss history) go to
`~/.cache/soft_peft/runs/gsm8k/{soft,sft}`, outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

# The Hub dataset by default; `--data FILE` for a local copy of its train split (JSONL with question/answer)
DATA = "openai/gsm8k"
RUNS = Path(os.environ.get("SOFT_PEFT_RUNS_DIR", Path.home() / ".cache" / "soft_peft" / "runs" / "gsm8k"))
EVAL_DIR = RUNS / "eval"
DOCS = REPO / "docs"
HELD_OUT_SIZE = 200
SPLIT_SEED = 0
TRAINERS = ("soft", "sft")  # SoFT first: another benchmark reads its checkpoint


def load_split(data: str = DATA):
    """The study's GSM8K split of ``data`` (a Hub id or a local file): ``(train, held_out)`` prompt-completion datasets
    (7273 / 200 rows for the full train split)."""
    from soft_peft.data import held_out_split, load_prompt_completion

    config = None if os.path.exists(os.path.expanduser(data)) else "main"  # the Hub dataset's configuration
    dataset = load_prompt_completion(data, "gsm8k", config_name=config)
    return held_out_split(dataset, test_size=HELD_OUT_SIZE, seed=SPLIT_SEED)


def _peak_rss_gb() -> float:
    # Linux reports ru_maxrss in KiB; the peak of this process, which only trains one model
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def train_one(trainer_name: str, args: argparse.Namespace) -> Path:
    """Fine-tune the base model with ``trainer_name`` (``soft`` or ``sft``) and save it under ``RUNS/<name>``.

    Returns:
        The checkpoint folder; ``train_stats.json`` beside the weights records wall time and peak RSS.
    """
    import torch
    from get_smollm2 import get_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from soft_peft import SoFTConfig, SoFTTrainer

    # Denormal floats (< 1e-38) can make CPU kernels many times slower; flushing them to zero is numerically moot
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    base = str(get_smollm2())
    train, _ = load_split(args.data)
    target = RUNS / trainer_name
    work = RUNS / f"{trainer_name}.work"
    common = dict(
        output_dir=str(work),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.0,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=max(1, min(5, args.max_steps // 4)),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    # The paper's loss (mean over exits), not soft-peft's default: this script replicates the paper
    config = SoFTConfig(**common, exit_loss_weights="uniform") if trainer_name == "soft" else SFTConfig(**common)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer_class = SoFTTrainer if trainer_name == "soft" else SFTTrainer
    trainer = trainer_class(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    train_started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_started
    # Write to a side folder and rename, so a reader never sees a half-written checkpoint
    partial = RUNS / f"{trainer_name}.partial"
    trainer.save_model(str(partial))
    tokenizer.save_pretrained(str(partial))
    stats = {
        "trainer": type(trainer).__name__,
        "base_model": base,
        "exit_layers": getattr(trainer, "exit_layers", None),
        "train_rows": len(train),
        "held_out_rows": HELD_OUT_SIZE,
        "split": f"held_out_split(load_prompt_completion({os.path.basename(args.data)!r}, 'gsm8k'), test_size=200, "
        "seed=0)",
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": common["warmup_steps"],
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, result.global_step), 2),
        "total_seconds_with_loading": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
        "final_train_loss": result.training_loss,
        "log_history": trainer.state.log_history,
    }
    (partial / "train_stats.json").write_text(json.dumps(stats, indent=2))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    print(f"[{trainer_name}] saved {target}: {stats['train_seconds']} s, peak RSS {stats['peak_rss_gb']} GB")
    return target


def cmd_train(args: argparse.Namespace) -> int:
    """Train each requested model in its own process, so each peak RSS is that model's alone."""
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.only:
        train_one(args.only, args)
        return 0
    for name in args.trainers.split(","):
        command = [sys.executable, __file__, "train", "--only", name, *_budget_flags(args)]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return 0


def _budget_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--max_steps={args.max_steps}",
        f"--batch_size={args.batch_size}",
        f"--max_length={args.max_length}",
        f"--learning_rate={args.learning_rate}",
        f"--seed={args.seed}",
        "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing",
    ]


def write_held_out(data: str = DATA) -> Path:
    """Write the 200 held-out rows of ``data`` as prompt-completion JSONL (what `soft-peft eval` reads); returns its
    path."""
    _, held_out = load_split(data)
    path = RUNS / "held_out.jsonl"
    RUNS.mkdir(parents=True, exist_ok=True)
    # Several eval steps may run at once: write aside and rename, so none reads a half-written file
    partial = path.with_name(f"held_out.{os.getpid()}.partial")
    held_out.to_json(str(partial), lines=True)
    partial.replace(path)
    return path


def eval_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The `soft-peft eval` command lines of the study, by output name (each is printed next to its figure)."""
    from get_smollm2 import get_smollm2

    data = str(RUNS / "held_out.jsonl")
    exits = "9,12,15,18,21,24,27,30"
    common = ["--dataset_name", data, "--batch_size", "4", "--max_length", str(args.max_length)]
    scored = [*common, "--max_samples", str(args.eval_samples), "--exit_layers", exits]
    generated = [
        *common,
        *("--max_samples", str(args.generate_samples), "--exit_layers", args.generate_exits, "--generate"),
        *("--max_new_tokens", str(args.max_new_tokens)),
    ]
    soft, sft, base = str(RUNS / "soft"), str(RUNS / "sft"), str(get_smollm2())
    return {
        "base": ["--model_name_or_path", base, *scored, "--output_dir", str(EVAL_DIR / "base")],
        "soft_vs_sft": [
            *("--model_name_or_path", soft, "--compare_to", sft),
            *scored,
            *("--output_dir", str(EVAL_DIR / "soft_vs_sft")),
        ],
        "generate_soft": ["--model_name_or_path", soft, *generated, "--output_dir", str(EVAL_DIR / "generate_soft")],
        "generate_sft": ["--model_name_or_path", sft, *generated, "--output_dir", str(EVAL_DIR / "generate_sft")],
        "generate_base": ["--model_name_or_path", base, *generated, "--output_dir", str(EVAL_DIR / "generate_base")],
    }


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the study's evaluations (`--evals` selects some), each as `soft-peft eval` in this process."""
    from soft_peft.cli import main as soft_peft_main

    write_held_out(args.data)
    commands = eval_commands(args)
    for name in args.evals.split(","):
        print("+ soft-peft eval " + " ".join(commands[name]), flush=True)
        started = time.perf_counter()
        code = soft_peft_main(["eval", *commands[name]])
        print(f"[{name}] exit code {code}, {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            return code
    return 0


def _load_json(path: Path) -> dict:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python benchmarks/replicate.py train` and `... eval` first.")
    return json.loads(path.read_text())


def _claims(soft: dict, sft: dict) -> list[str]:
    """The paper's three claims, each with its numbers and a verdict under a stated criterion."""
    layers = sorted(int(k) for k in soft)
    last, inner = layers[-1], layers[:-1]
    gaps = [sft[str(k)]["loss"] - soft[str(k)]["loss"] for k in inner]
    accuracy_gaps = [soft[str(k)]["token_accuracy"] - sft[str(k)]["token_accuracy"] for k in inner]
    mean_gap = sum(gaps) / len(gaps)
    verdict_1 = "DID NOT HOLD" if not all(g > 0 for g in gaps) else "HELD" if mean_gap >= 1.0 else "PARTLY HELD"
    lines = [
        "1. **SoFT's intermediate sub-models are far better than SFT's at the same depth.** "
        f"{verdict_1} (criterion: lower held-out loss at every intermediate exit, by at least 1 nat on average for "
        "'far'). "
        f"Loss gap SFT − SoFT at exits {inner}: {', '.join(f'{g:.2f}' for g in gaps)} nats "
        f"(mean {mean_gap:.2f}); "
        f"token-accuracy gain: {', '.join(f'{100 * g:+.1f}' for g in accuracy_gaps)} points.",
    ]
    soft_last, sft_last = soft[str(last)], sft[str(last)]
    relative = (soft_last["loss"] - sft_last["loss"]) / sft_last["loss"]
    held_2 = abs(relative) <= 0.05
    lines.append(
        "2. **SoFT's last layer stays close to SFT's.** "
        f"{'HELD' if held_2 else 'DID NOT HOLD'} (criterion: last-layer loss within 5% of SFT's). "
        f"Exit {last}: SoFT loss {soft_last['loss']:.3f} vs SFT {sft_last['loss']:.3f} ({100 * relative:+.1f}%); "
        f"token accuracy {100 * soft_last['token_accuracy']:.1f}% vs {100 * sft_last['token_accuracy']:.1f}%."
    )
    middle = [k for k in inner if 0.45 * last <= k <= 0.75 * last]
    soft_kl = [soft[str(k)]["kl_to_last"] for k in middle]
    sft_kl = [sft[str(k)]["kl_to_last"] for k in middle]
    closer = all(a < b for a, b in zip(soft_kl, sft_kl, strict=True))
    close = max(soft_kl) < 1.0
    verdict_3 = "HELD" if closer and close else "PARTLY HELD" if closer else "DID NOT HOLD"
    lines.append(
        "3. **SoFT's middle exits are close to the last layer in output distribution.** "
        f"{verdict_3} (criterion: KL(last ‖ exit) lower than SFT's at every middle exit, {middle} = 45–75% of "
        "depth, and below 1 nat for 'close'; lower but not below 1 nat is 'partly'). "
        f"SoFT KL: {', '.join(f'{v:.2f}' for v in soft_kl)} nats; SFT KL: "
        f"{', '.join(f'{v:.2f}' for v in sft_kl)} nats. Cosine to last (SoFT / SFT): "
        + ", ".join(f"{soft[str(k)]['cosine_to_last']:.2f} / {sft[str(k)]['cosine_to_last']:.2f}" for k in middle)
        + "."
    )
    return lines


def _logged(stats: dict) -> list[dict]:
    return [h for h in stats["log_history"] if "loss" in h]


def render_results(args, stats, base_exits, soft, sft, pair, generated) -> str:
    """The text of docs/results.md (every number read from the run's JSON outputs)."""
    home = str(Path.home())
    commands = {name: [part.replace(home, "~") for part in line] for name, line in eval_commands(args).items()}
    soft_stats = st = stats["soft"]
    settings = pair["settings"]
    lines = [
        "# Results: SoFT vs SFT on SmolLM2-135M-Instruct and GSM8K",
        "",
        "**Replication** of the paper's setting (uniform loss) at a small budget. Generated by "
        "`python benchmarks/replicate.py report` from the outputs of `train` and `eval` (all three: "
        "`python benchmarks/replicate.py all`). Numbers are from one run on a shared 2-core CPU.",
        "",
        "## Setup",
        "",
        "- Base model: SmolLM2-135M-Instruct (30 layers, tied head), `python tools/get_smollm2.py`.",
        "- Data: GSM8K train (`openai/gsm8k`, `main`; `--data FILE` reads a local copy), as prompt-completion "
        "(`Question: ...\\nAnswer: ` → the worked answer with its `#### N` line), split with "
        f"`held_out_split(dataset, test_size=200, seed=0)`: {soft_stats['train_rows']} training rows, 200 held out "
        "(written to `~/.cache/soft_peft/runs/gsm8k/held_out.jsonl`).",
        f"- Equal budget for both trainers: {st['max_steps']} steps × batch {st['per_device_train_batch_size']} "
        f"({st['max_steps'] * st['per_device_train_batch_size']} sequences), max_length {st['max_length']}, AdamW "
        f"lr {st['learning_rate']} with cosine decay and {st['warmup_steps']} warm-up step(s), seed {st['seed']}, "
        f"fp32, completion-only loss, gradient checkpointing {'on' if st['gradient_checkpointing'] else 'off'}. "
        f"SoFT trains the default 8 exits {st['exit_layers']} with uniform weights. This tiny budget was chosen "
        "to fit the shared CPU; it is far from the paper's full fine-tuning.",
        f"- Evaluation: the first {settings['num_examples']} held-out rows ({settings['num_tokens']} completion "
        "tokens), teacher-forced; every exit through the model's own final norm and tied head.",
        "",
        "Recreate the checkpoints (`~/.cache/soft_peft/runs/gsm8k/{soft,sft}`, plain HF folders with the tokenizer "
        "and `train_stats.json`):",
        "",
        "```bash",
        f"python benchmarks/replicate.py train --max_steps {soft_stats['max_steps']} --batch_size "
        f"{soft_stats['per_device_train_batch_size']} --max_length {soft_stats['max_length']} --learning_rate "
        f"{soft_stats['learning_rate']} --seed {soft_stats['seed']}",
        "```",
        "",
        "## Training time and memory",
        "",
        "| trainer | steps | train time (s) | s/step | peak RSS (GB) | mean train loss |",
        "|---|---|---|---|---|---|",
    ]
    for name in TRAINERS:
        st = stats[name]
        lines.append(
            f"| {st['trainer']} | {st['max_steps']} | {st['train_seconds']} | {st['seconds_per_step']} | "
            f"{st['peak_rss_gb']} | {st['final_train_loss']:.3f} |"
        )
    lines += [
        "",
        "Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the process that trained only that model "
        "(model loading and tokenization included). Mean train loss is the logged loss averaged over the run: "
        "SoFTTrainer's is the mean over its 8 exits, SFTTrainer's the last layer's. The CPU was shared with other "
        "jobs, with different loads during the two runs, so the times do not measure SoFT's overhead.",
        "",
        "Last-layer training loss on the same batches (both runs see the same data order):",
        "",
        "| step | " + " | ".join(str(h["step"]) for h in _logged(stats["sft"])) + " |",
        "|---" * (1 + len(_logged(stats["sft"]))) + "|",
        "| SFT | " + " | ".join(f"{h['loss']:.3f}" for h in _logged(stats["sft"])) + " |",
        "| SoFT exit 30 | " + " | ".join(f"{h['exit_30/loss']:.3f}" for h in _logged(stats["soft"])) + " |",
        "",
        "## Per-exit held-out metrics",
        "",
        "```bash",
        "soft-peft eval " + " ".join(commands["base"]),
        "soft-peft eval " + " ".join(commands["soft_vs_sft"]),
        "```",
        "",
        "| exit | base loss | SFT loss | SoFT loss | base acc | SFT acc | SoFT acc | base KL | SFT KL | SoFT KL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in sorted(int(k) for k in soft):
        row = [base_exits.get(str(layer), {}), sft[str(layer)], soft[str(layer)]]
        cells = [f"{m['loss']:.3f}" for m in row] + [f"{100 * m['token_accuracy']:.1f}%" for m in row]
        cells += [f"{m['kl_to_last']:.3f}" for m in row]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "loss = mean token cross-entropy on the completion (nats; perplexity = exp(loss) is in the metrics.json "
        "files); acc = completion token accuracy (argmax); KL = KL(P_last ‖ P_exit) within the same model. The "
        "cosine similarity of normed hidden states to the last layer (in the metrics.json files and the heat-map) "
        "stays below 0.2 up to exit 21 for every model, so KL is the more telling measure here.",
        "",
        "![per-exit curves](results_exit_curves.png)",
        "",
        "## Similarity heat-maps (the paper's figure)",
        "",
        "Entry (row exit i, column exit j) is the mean over completion tokens of KL(P_column,j ‖ P_row,i); the "
        "off-diagonal panels are cross-model: SoFT's exits against SFT's (and the reverse); the last column is "
        "each exit against a model's last layer. Numbers from the `soft_vs_sft` command above (which writes the same "
        "heat-maps to its output folder); these PNGs and the per-exit curves are drawn by "
        "`python benchmarks/replicate.py report`.",
        "",
        "![KL heat-maps](results_similarity_kl.png)",
        "",
        "![cosine heat-maps](results_similarity_cosine.png)",
        "",
    ]
    lines += _generation_section(commands, generated)
    lines += ["## The paper's claims, checked", ""] + _claims(soft, sft) + [""]
    lines += [
        "## Limits of this study",
        "",
        f"- One seed and a {st['max_steps']}-step budget, where the paper fine-tunes for full epochs; the exits are "
        "far from converged, so the claims are checked at the start of training, not at its end.",
        f"- Teacher-forced metrics on {settings['num_examples']} of the 200 held-out rows (the rows are fixed: the "
        "first ones of `held_out.jsonl`), chosen to fit the shared CPU.",
        "- The pairwise judge (the paper's PandaLM table) is not part of this study: no judge model better than the "
        "135M model under test is available offline. `soft-peft eval --judge_model` and `judge_pairwise` are "
        "covered by tests with stub judges.",
        "- Wall times were measured on a 2-core CPU shared with other jobs and are only indicative.",
        "",
    ]
    return "\n".join(lines) + "\n"


def _generation_section(commands, generated) -> list[str]:
    runs = {name: generated.get(f"generate_{name}") for name in ("base", "sft", "soft")}
    runs = {name: run for name, run in runs.items() if run is not None}
    if not runs:
        return ["## Generation", "", "Not run for this report (`--evals` had no `generate_*` step).", ""]
    settings = next(iter(runs.values()))["settings"]
    lines = [
        "## Greedy generation (GSM8K answer accuracy, time per token)",
        "",
        "```bash",
        *("soft-peft eval " + " ".join(commands[f"generate_{name}"]) for name in runs),
        "```",
        "",
        f"The first {settings['num_examples']} held-out questions, up to {settings['max_new_tokens']} new tokens, "
        "greedy, batch 1, each exit decoded by `soft_peft.inference.extract_submodel` (a standard transformers model "
        "of the first k layers sharing the weights). Generation was slow on the shared CPU (see ms/token), so this "
        "is a smoke-scale run: too few questions, and a token budget below the median GSM8K answer length (~122 "
        "tokens), for answer accuracy to mean anything. It shows what each exit writes and its time per token "
        "(wall time, noisy).",
        "",
        "| model | exit | GSM8K answer accuracy | ms/token |",
        "|---|---|---|---|",
    ]
    for name, run in runs.items():
        for layer, values in sorted(run["exits"].items(), key=lambda item: int(item[0])):
            if "gsm8k_accuracy" in values:
                lines.append(
                    f"| {name} | {layer} | {values['gsm8k_accuracy']:.2f} ({values['num_generated']} questions) | "
                    f"{values['ms_per_token']:.1f} |"
                )
    for name, run in runs.items():
        samples = run.get("samples", {})
        outputs = {k: v for k, v in samples.items() if k.startswith("model_0_exit_")}
        if outputs:
            lines += ["", f"First question, {name} generations:", ""]
            lines += [f"- exit {k.rsplit('_', 1)[1]}: `{' '.join(v.split())[:300]}`" for k, v in outputs.items()]
    return lines + [""]


def cmd_report(args: argparse.Namespace) -> int:
    """Write docs/results.md and docs/results_*.png from the train stats and eval outputs."""
    from quality_report import extract_block, splice_block

    from soft_peft.evaluation.report import plot_exit_curves, plot_similarity

    stats = {name: _load_json(RUNS / name / "train_stats.json") for name in TRAINERS}
    base = _load_json(EVAL_DIR / "base" / "metrics.json")
    pair = _load_json(EVAL_DIR / "soft_vs_sft" / "metrics.json")
    soft, sft, base_exits = pair["exits"], pair["compare_exits"], base["exits"]
    generated = {}
    for name in ("generate_soft", "generate_sft", "generate_base"):
        path = EVAL_DIR / name / "metrics.json"
        generated[name] = json.loads(path.read_text()) if path.exists() else None
    curves = {
        label: {int(k): v for k, v in exits.items()}
        for label, exits in (("base", base_exits), ("SFT", sft), ("SoFT", soft))
    }
    DOCS.mkdir(exist_ok=True)
    plot_exit_curves(curves, str(DOCS / "results_exit_curves.png"))
    similarity = pair["similarity"]["pairs"]
    for metric, title in (
        ("kl", "KL divergence (nats), held-out GSM8K"),
        ("cosine", "cosine of normed hidden states"),
    ):
        matrices = {}
        for key, value in similarity.items():
            row, column = (part.replace("soft", "SoFT").replace("sft", "SFT") for part in key.split(" vs "))
            matrices[(row, column)] = (value[metric], value["row_exits"], value["column_exits"])
        plot_similarity(matrices, title, str(DOCS / f"results_similarity_{metric}.png"))
    text = render_results(args, stats, base_exits, soft, sft, pair, generated)
    # Keep the quality study's summary block, which `quality_study.py report` writes into the same file
    previous = (DOCS / "results.md").read_text() if (DOCS / "results.md").exists() else ""
    block = extract_block(previous)
    (DOCS / "results.md").write_text(text if block is None else splice_block(text, block))
    print(f"wrote {DOCS / 'results.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the study (budget flags default to the documented run)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "eval", "report", "all"])
    parser.add_argument("--max_steps", type=int, default=20, help="Optimizer steps per model (equal budget).")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Recompute activations in backward (less memory, ~25%% more compute). Off in the documented run.",
    )
    parser.add_argument(
        "--data", default=DATA, help="GSM8K train: the Hub dataset (default) or a local JSONL with question/answer."
    )
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="Comma-separated subset of soft,sft.")
    parser.add_argument("--only", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--evals", default="base,soft_vs_sft,generate_soft,generate_sft")
    parser.add_argument("--eval_samples", type=int, default=32, help="Held-out rows for the teacher-forced metrics.")
    parser.add_argument("--generate_samples", type=int, default=2, help="Held-out questions decoded per exit.")
    parser.add_argument("--generate_exits", default="15,30", help="Exits decoded with --generate.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one step of the study, or all of them."""
    args = build_parser().parse_args(argv)
    steps = {"train": [cmd_train], "eval": [cmd_eval], "report": [cmd_report]}
    steps["all"] = steps["train"] + steps["eval"] + steps["report"]
    for step in steps[args.step]:
        code = step(args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
