"""Every Python snippet of README.md runs as written, offline.

How the Hub is replaced (nothing in the snippets' text changes):
- Models: the Hub id `HuggingFaceTB/SmolLM2-135M` is served from a temporary Hugging Face cache (HF_HUB_OFFLINE=1 is
  set for tests), holding a tiny random Llama, or the real SmolLM2-135M-Instruct folder for the snippets whose exits
  need its 30 layers (those are `slow`).
- Datasets: `datasets.load_dataset("trl-lib/Capybara", ...)` returns the Alpaca seed tasks shipped in data/ as
  conversations.
- Training: `SoFTConfig` gets a tiny run on top of the snippet's own arguments (1 step, batch 2, 64 tokens).
Each snippet runs in a temporary folder holding a link to data/, as it would from the repository root.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
from datasets import Dataset
from huggingface_hub import constants
from tiny_models import tiny_model, tiny_tokenizer

import soft_peft

ROOT = Path(__file__).resolve().parents[1]
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
FAKE_COMMIT = "0" * 40
LOAD_DATASET = datasets.load_dataset
TINY_RUN = {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "report_to": "none"}
TINY_RUN.update(save_strategy="no", logging_steps=1)


def readme_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


# One entry per README snippet, found by a line it contains: whether it needs the real model's 30 layers
SNIPPETS = {
    "trainer = SoFTTrainer(": False,
    "soft = SortedLossWrapper(model)": False,
    "peft_config = LoraConfig(": False,
    "out = self_speculative_generate(": True,
}


def test_every_snippet_is_listed():
    found = [next((key for key in SNIPPETS if key in snippet), snippet[:60]) for snippet in readme_snippets()]
    assert found == list(SNIPPETS)


def serve_from_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as the cached snapshot of `repo_id` (the layout `hf_hub_download` reads offline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    for file in folder.iterdir():
        (snapshot / file.name).symlink_to(file.resolve())


def capybara_from_alpaca_seed(*args, **kwargs) -> Dataset:
    if args[0] != "trl-lib/Capybara":  # local files load as usual
        return LOAD_DATASET(*args, **kwargs)
    lines = (ROOT / "data" / "alpaca_seed" / "seed_tasks_alpaca.jsonl").read_text().splitlines()[:8]
    turns = [json.loads(line) for line in lines]
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": t["instruction"]},
                    {"role": "assistant", "content": t["output"]},
                ]
            }
            for t in turns
        ]
    )


def run_snippet(key: str, model_folder: Path, tmp_path: Path, monkeypatch) -> dict:
    snippet = next(snippet for snippet in readme_snippets() if key in snippet)
    cache = tmp_path / "hub-cache"
    serve_from_hub_cache(cache, HUB_MODEL, model_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(datasets, "load_dataset", capybara_from_alpaca_seed)
    config_class = soft_peft.SoFTConfig
    monkeypatch.setattr(soft_peft, "SoFTConfig", lambda **kwargs: config_class(**{**kwargs, **TINY_RUN}))
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(work)
    namespace: dict = {"__name__": "readme"}
    exec(compile(snippet, f"README.md snippet {key!r}", "exec"), namespace)
    return namespace


@pytest.fixture
def tiny_model_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("key", [key for key, real in SNIPPETS.items() if not real])
def test_snippet_runs_with_a_tiny_model(key, tiny_model_folder, tmp_path, monkeypatch):
    namespace = run_snippet(key, tiny_model_folder, tmp_path, monkeypatch)
    if "trainer" in namespace:
        assert namespace["trainer"].state.global_step == 1
        assert not namespace["trainer"].args.bf16  # the snippet itself turns bf16 off without a GPU
    if "soft" in namespace:
        assert (tmp_path / "work" / "smollm2-soft" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("key", [key for key, real in SNIPPETS.items() if real])
def test_snippet_runs_with_the_real_model(key, smollm2_path, tmp_path, monkeypatch):
    namespace = run_snippet(key, smollm2_path, tmp_path, monkeypatch)
    assert namespace["out"].sequences.shape[0] == 1
