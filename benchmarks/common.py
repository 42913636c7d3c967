"""What every benchmark shares: the GSM8K split, the base model, model shapes and their parameter counts, peak
memory, timing on an accelerator and the command-line helpers.

Run the benchmarks from the repository root as modules (``python -m benchmarks.train_cost ...``): the root is then on
``sys.path``, so ``benchmarks`` and this checkout's ``soft_peft`` import without any path setup.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# GSM8K train from the Hub by default; every `--data` flag also takes a local copy (JSONL with question/answer)
GSM8K = "openai/gsm8k"
# The held-out split every benchmark shares: `held_out_split(rows, test_size=200, seed=0)`
HELD_OUT = 200
SPLIT_SEED = 0

# Model shapes (config.json keys of a LLaMA-style decoder) for random-init runs: no weights are downloaded
SHAPES = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
    ),
    # meta-llama/Llama-2-13b-hf config.json
    "llama2-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000,
    ),
    # meta-llama/Llama-3.2-1B config.json
    "llama3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    # The CPU dry run's shape: 8 layers, so 8 exits are every layer; an odd vocabulary
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1001,
    ),
}  # fmt: skip


def portable(text: str, repo: Path = REPO) -> str:
    """`text` naming no path of this machine: the checkout's paths become relative and the home folder `~`. For what
    the benchmarks write into files that are committed and read on other machines."""
    return text.replace(str(repo) + "/", "").replace(str(Path.home()), "~")


def gsm8k_config(data: str) -> str | None:
    """The dataset configuration to load ``data`` with: ``"main"`` for the Hub dataset, ``None`` for a local file."""
    return None if os.path.exists(os.path.expanduser(data)) else "main"


def gsm8k_split(data: str = GSM8K, test_size: int = HELD_OUT, raw: bool = False):
    """The benchmarks' fixed GSM8K split of ``data`` (the Hub id or a local copy of its train split).

    Args:
        data: ``openai/gsm8k`` or a local JSONL with ``question``/``answer``.
        test_size: Rows held out (200 everywhere but in tests).
        raw: Keep the raw ``question``/``answer`` rows instead of prompt-completion ones.

    Returns:
        ``(train, held_out)`` datasets: ``held_out_split(rows, test_size, seed=0)``.
    """
    import soft_peft.data as data_module

    if raw:
        rows = data_module.load_raw_dataset(data, config_name=gsm8k_config(data))
    else:
        rows = data_module.load_prompt_completion(data, "gsm8k", config_name=gsm8k_config(data))
    return data_module.held_out_split(rows, test_size, seed=SPLIT_SEED)


def smollm2_path() -> str:
    """The cached SmolLM2-135M-Instruct folder that `python tools/get_smollm2.py` prints (fetched once)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "get_smollm2.py")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"tools/get_smollm2.py failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def model_config(shape: str | dict):
    """A ``LlamaConfig`` of a shape of `SHAPES` (by name) or of a dict of config.json keys."""
    from transformers import LlamaConfig

    values = SHAPES[shape] if isinstance(shape, str) else shape
    return LlamaConfig(**values, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def random_model(shape: str | dict, device: str = "cpu", dtype=None, seed: int = 0):
    """A random-init causal LM of ``shape`` built directly on ``device`` (no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype or torch.bfloat16)


def parameter_count(shape: str | dict) -> int:
    """Parameters of a model of ``shape``, counted on a meta-device instance (exact, no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config(shape)).parameters())


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (CUDA kernels run asynchronously); nothing on a CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(function: Callable, device: str = "cpu") -> Callable[..., float]:
    """``function``'s wall time in seconds per call, including the device work it queued."""

    def run(*args) -> float:
        synchronize(device)
        started = time.perf_counter()
        function(*args)
        synchronize(device)
        return time.perf_counter() - started

    return run


def machine_line() -> str:
    """``Machine: <arch>, <n> CPU cores, torch <version>[, <GPU>]``: the header line of every report."""
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}{gpu}."


def parse_ints(text: str) -> list[int]:
    """``"9,12,"`` -> ``[9, 12]``: a comma-separated list of ints (empty parts skipped), as an argparse ``type``."""
    return [int(part) for part in text.split(",") if part.strip()]


def parse_floats(text: str) -> list[float]:
    """``"0.9,0.5"`` -> ``[0.9, 0.5]``, as an argparse ``type``."""
    return [float(part) for part in text.split(",") if part.strip()]


def parse_variant(text: str, reserved: tuple[str, ...] = ()) -> tuple[str, str]:
    """``'last_half=--exit_loss_weights last:0.5'`` -> ``("last_half", "--exit_loss_weights last:0.5")``.

    Raises:
        argparse.ArgumentTypeError: without a name, with a name of ``reserved``, or with flags not starting ``--``.
    """
    name, separator, flags = text.partition("=")
    name, flags = name.strip(), flags.strip()
    if not separator or not name or name in reserved or (flags and not flags.startswith("--")):
        taken = f" (not one of {list(reserved)})" if reserved else ""
        raise argparse.ArgumentTypeError(f'expected NAME="--flag value ..." with a new name{taken}, got {text!r}')
    return name, flags


def add_data_argument(parser: argparse.ArgumentParser, flag: str = "--data", role: str = "") -> None:
    """Add the GSM8K data flag: the Hub dataset by default, or a local copy of its train split."""
    parser.add_argument(
        flag, default=GSM8K, help=f"GSM8K train: {GSM8K} (default) or a local JSONL with question/answer{role}."
    )


def print_and_write(text: str, output: str | Path | None) -> None:
    """Print a report and, when ``output`` is given, also write it there."""
    print(text)
    if output:
        Path(output).write_text(text + "\n")
