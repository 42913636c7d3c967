"""Helpers shared by the example, CLI and distributed tests: tiny model folders, tiny datasets, runs, logs."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import torch
from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RECIPES = ROOT / "recipes"
TINY_EXITS = "2,4"  # the tiny models have 4 layers
# Two optimizer steps of a tiny model on CPU: what every example test trains
TINY_TRAIN_ARGS = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "2",
    "--learning_rate", "1e-3",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--report_to", "none",
    "--exit_layers", TINY_EXITS,
    "--use_cpu", "true",
    "--dtype", "float32",
    "--max_length", "256",
    "--seed", "0",
]  # fmt: skip


# How the shipped accelerate configs run on CPU with 2 processes (gloo). accelerate 1.15 drops DeepSpeed when
# `use_cpu` is set, and forms no process group on a GPU-less machine without it, so DDP takes `--use_cpu true` and
# ZeRO-3 takes `--ddp_backend gloo`. FSDP has no CPU path in accelerate 1.15 (see tests/distributed/test_fsdp2.py).
CPU_LAUNCH = ["--num_processes", "2", "--mixed_precision", "no"]
CPU_SCRIPT_ARGS = {"ddp": ["--use_cpu", "true"], "zero3": ["--ddp_backend", "gloo"], "single": ["--use_cpu", "true"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_args(per_device_batch: int = 2, steps: int = 2) -> list[str]:
    """TINY_TRAIN_ARGS with another batch size and step count, without the device flags (see CPU_SCRIPT_ARGS)."""
    args = list(TINY_TRAIN_ARGS)
    args[args.index("--per_device_train_batch_size") + 1] = str(per_device_batch)
    args[args.index("--max_steps") + 1] = str(steps)
    del args[args.index("--use_cpu") : args.index("--use_cpu") + 2]
    return args


def accelerate_launch(
    config: str, script: Path, argv: list[str], timeout: float = 600, env: dict[str, str] | None = None
):
    """`accelerate launch` with a shipped config in recipes/accelerate, 2 CPU processes (`env`: added variables)."""
    launch = ["accelerate", "launch", "--config_file", str(RECIPES / "accelerate" / f"{config}.yaml"), *CPU_LAUNCH]
    launch += ["--main_process_port", str(free_port())]
    command = [*launch, str(script), *argv, *CPU_SCRIPT_ARGS[config]]
    return run(command, timeout=timeout, check=False, env_overrides=env)


def save_tiny_model(path: Path, arch: str = "llama") -> Path:
    """A tiny random causal LM and the char-level tokenizer saved as a plain HF folder."""
    tiny_model(arch).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca_rows(count: int = 16) -> list[dict]:
    return [
        {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"{i} {i + 1}", "output": str(2 * i + 1)}
        for i in range(count)
    ]


def gsm8k_rows(count: int = 16) -> list[dict]:
    return [{"question": f"What is {i} times 3?", "answer": f"{i} * 3 = {3 * i}\n#### {3 * i}"} for i in range(count)]


def triviaqa_rows(count: int = 16) -> list[dict]:
    return [{"question": f"Which number follows {i}?", "answer": {"value": str(i + 1)}} for i in range(count)]


def run(
    args: list[str], timeout: float = 600, check: bool = True, env_overrides: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command from the project root with offline, single-threaded settings (and `env_overrides`); show its
    output on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.update(env_overrides or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        command = " ".join(map(str, args))
        raise AssertionError(f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run_example(name: str, argv: list[str], monkeypatch) -> int:
    """Run `examples/<name>.py` as `__main__` in this process (no second interpreter start-up); its exit code."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py"), *argv])
    try:
        runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    except SystemExit as exited:
        return exited.code
    raise AssertionError(f"examples/{name}.py did not exit through sys.exit")


def log_history(output_dir: Path) -> list[dict]:
    """The `log_history` of the `trainer_state.json` that a run saves beside its final model."""
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def step_logs(output_dir: Path) -> dict[int, dict]:
    """Training log entries by step (the entries that carry a loss)."""
    return {entry["step"]: entry for entry in log_history(output_dir) if "loss" in entry}


def exit_metrics(entry: dict) -> dict[str, float]:
    """The per-exit metrics of a log entry (loss, accuracy, ...). Not the exit weights: settings, not measurements,
    logged at the first step of each training process (so a resumed run logs them again) and at every step of a
    schedule."""
    return {key: value for key, value in entry.items() if key.startswith("exit_") and not key.endswith("/weight")}


@torch.no_grad()
def saved_model_exit_losses(model_dir: Path, texts: list[str]) -> dict[int, float]:
    """Per-exit mean token losses of a saved model reloaded as a *vanilla* transformers model, on `texts`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_peft import SortedLossWrapper

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    output = SortedLossWrapper(model, exit_layers=model.config.soft_exit_layers)(**batch, labels=labels)
    return {layer: loss.item() for layer, loss in output.exit_losses.items()}
