"""Training cost of SoFT (8 exits) against TRL's SFTTrainer on random-init models of real shape: step time and peak
memory side by side, with the FLOP model's prediction beside them. No weights are needed.

    python benchmarks/train_cost_gpu.py --shapes llama3-8b,llama2-13b --output_dir out/   # one H200, ~3 min
    python benchmarks/train_cost_gpu.py --shapes tiny --device cpu                          # the CPU dry run, seconds

Both trainers run in this process, one after the other, on the same GSM8K-like batches: fixed-length rows with
`--labelled` of their tokens in the completion (GSM8K: ~68%), a bf16 model (as the recipes load it), gradient
checkpointing, TRL's default optimizer. The batch fills the GPU: `--fill` of its memory after the model states, by
the activation model of recipes/memory_estimate.py; an out-of-memory step halves it once. Peak memory is
`torch.cuda.max_memory_allocated` per run (peak RSS on the CPU, which is not per run and only shows the mechanics).

Targets (issue 15): SoFT's peak memory <= 1.05x SFT's; SoFT's step-time ratio to SFT <= 1.10x the FLOP model's ratio
(`train_overhead.step_flops`: 8 FLOPs per non-embedding parameter per token with checkpointing, and 8 H V per
labelled position per exit for the chunked head, which both trainers run only on labelled positions).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import step_flops  # noqa: E402

SHAPES = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    # meta-llama/Llama-2-13b-hf config.json
    "llama2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    # The dry run's shape: 8 layers, so 8 exits are every layer; an odd vocabulary
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1001,
    ),
}
# Bytes per trained parameter: bf16 weight + bf16 gradient + two bf16 AdamW moments (torch keeps the param dtype)
STATE_BYTES = 8


def tokenizer():
    """A four-token tokenizer: the rows are pre-tokenized, TRL only needs its pad and EOS tokens."""
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
    """Pre-tokenized rows of `seq` random tokens whose last `labelled` share is the completion (the trained part)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    completion = round(seq * labelled)
    ids = torch.randint(4, vocab, (count, seq), generator=generator).tolist()
    mask = [[0] * (seq - completion) + [1] * completion] * count
    return Dataset.from_dict({"input_ids": ids, "completion_mask": mask})


def activation_bytes_per_token(shape: dict, seq: int) -> float:
    """Checkpointed bf16 layer inputs plus one layer recomputed in full (recipes/memory_estimate.py's model)."""
    hidden, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    return layers * hidden * 2 + 34 * hidden + 5 * heads * seq


def parameter_count(shape: dict) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(LlamaConfig(**shape)).parameters())


def fill_batch(shape: dict, seq: int, fill: float, device: str) -> int:
    """Rows per batch that use `fill` of the GPU's memory after the model states (4 rows on the CPU)."""
    if device != "cuda":
        return 4
    total = torch.cuda.get_device_properties(0).total_memory
    free_for_activations = fill * total - STATE_BYTES * parameter_count(shape)
    if free_for_activations <= 0:
        raise SystemExit(f"the model states alone exceed {fill:.0%} of the GPU's {total / 1e9:.0f} GB")
    return max(1, int(free_for_activations / (activation_bytes_per_token(shape, seq) * seq)))


def build_model(shape: dict, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_once(mode: str, shape: dict, batch: int, args) -> dict:
    """`args.steps` measured steps after one warm-up step of `mode` ("sft" or "soft"); times and peak memory."""
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from soft_peft import SoFTConfig, SoFTTrainer

    device = args.device
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
    model = build_model(shape, device)
    rows = gsm8k_like_rows(batch * (args.steps + 1), args.seq, args.labelled, shape["vocab_size"])
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="train_cost_"),  # nothing is saved; keeps --output_dir to the results
        max_steps=args.steps + 1,
        per_device_train_batch_size=batch,
        max_length=args.seq,
        completion_only_loss=True,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=True,
        gradient_checkpointing=True,
        use_cpu=device == "cpu",
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    if mode == "sft":
        trainer_class, config = SFTTrainer, SFTConfig(**common)
    else:
        layers = shape["num_hidden_layers"]
        # The paper's 8 exits by default; below 10 layers those collide, so the last 8 layers there
        exits = None if layers >= 10 else list(range(max(1, layers - 7), layers + 1))
        trainer_class, config = SoFTTrainer, SoFTConfig(**common, exit_layers=exits)

    step_times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync(device)
            step_times.append(time.perf_counter() - self.start)

    trainer = trainer_class(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer(), callbacks=[StepTimer()]
    )
    trainer.train()
    if device == "cuda":
        peak_gb = (torch.cuda.max_memory_allocated() - baseline) / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    exits = list(getattr(trainer, "exit_layers", [shape["num_hidden_layers"]]))
    result = {
        "mode": mode,
        "exits": exits,
        "batch": batch,
        "tokens": batch * args.seq,
        "labelled": batch * round(args.seq * args.labelled),
        "median_step_s": statistics.median(step_times[1:]),
        "step_times": step_times,
        "peak_gb": peak_gb,
        "hidden": shape["hidden_size"],
        "vocab": shape["vocab_size"],
        "params": sum(p.numel() for p in model.parameters()),
        "embedding_params": model.get_input_embeddings().weight.numel(),
        "final_loss": trainer.state.log_history[-2].get("loss"),
    }
    result["flops"] = step_flops(result, result["labelled"] * len(exits))
    del trainer, model
    return result


def run_shape(name: str, args) -> list[dict]:
    shape = SHAPES[name]
    batch = args.batch or fill_batch(shape, args.seq, args.fill, args.device)
    results = []
    for mode in ("sft", "soft"):
        result = None
        try:
            result = train_once(mode, shape, batch, args)
        except torch.OutOfMemoryError:
            pass  # retried below, once the exception's frames (and the tensors they hold) are gone
        if result is None:
            if results:  # SFT fitted this batch and SoFT did not: that is the finding, not a reason to retry
                results.append({"shape": name, "mode": mode, "batch": batch, "error": "out of memory at SFT's batch"})
                break
            batch = max(1, batch // 2)
            print(f"[{name}] {mode}: out of memory, halving the batch to {batch}", flush=True)
            result = train_once(mode, shape, batch, args)
        result["shape"] = name
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def table(results: list[dict], device_name: str) -> str:
    lines = [
        f"Device: {device_name}; torch {torch.__version__}. bf16 model, gradient checkpointing, random init.",
        "",
        "| shape | batch x seq | labelled | SFT step (s) | SoFT step (s) | time ratio | FLOP ratio | "
        "SFT TFLOP/s | SFT peak (GB) | SoFT peak (GB) | memory ratio | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_shape: dict[str, dict[str, dict]] = {}
    for result in results:
        by_shape.setdefault(result.get("shape", "?"), {})[result["mode"]] = result
    for name, modes in by_shape.items():
        sft, soft = modes.get("sft"), modes.get("soft")
        if sft is None or soft is None or "error" in soft:
            lines.append(f"| {name} | {(soft or sft or {}).get('error', 'incomplete')} |" + " |" * 10)
            continue
        time_ratio = soft["median_step_s"] / sft["median_step_s"]
        flop_ratio = soft["flops"] / sft["flops"]
        memory_ratio = soft["peak_gb"] / sft["peak_gb"]
        met = memory_ratio <= 1.05 and time_ratio <= 1.10 * flop_ratio
        lines.append(
            f"| {name} | {sft['batch']} x {sft['tokens'] // sft['batch']} | {sft['labelled'] / sft['tokens']:.0%} "
            f"| {sft['median_step_s']:.2f} | {soft['median_step_s']:.2f} | {time_ratio:.3f}x | {flop_ratio:.3f}x "
            f"| {sft['flops'] / sft['median_step_s'] / 1e12:.0f} | {sft['peak_gb']:.1f} | {soft['peak_gb']:.1f} "
            f"| {memory_ratio:.3f}x | {'met' if met else 'MISSED'} |"
        )
    lines += [
        "",
        "Targets: memory ratio <= 1.05x and time ratio <= 1.10x the FLOP ratio. SoFT's exits: "
        + "; ".join(f"{r['shape']} {r['exits']}" for r in results if r.get("mode") == "soft" and "exits" in r)
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3-8b,llama2-13b", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=2, help="measured steps per trainer, after one warm-up step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (GSM8K: median ~180, max ~400)")
    parser.add_argument("--labelled", type=float, default=0.68, help="completion share of each row (GSM8K: 0.68)")
    parser.add_argument("--batch", type=int, default=0, help="rows per batch; 0: fill the GPU (--fill)")
    parser.add_argument("--fill", type=float, default=0.75, help="share of GPU memory the batch may fill")
    parser.add_argument("--output_dir", default="gpu_check_out", help="writes train_cost.md and train_cost.jsonl")
    args = parser.parse_args(argv)
    unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"

    results = []
    for name in args.shapes.split(","):
        results += run_shape(name, args)
    (output / "train_cost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    report = table(results, device_name)
    (output / "train_cost.md").write_text(report + "\n")
    print(report)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
