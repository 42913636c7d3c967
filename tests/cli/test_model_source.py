"""Every subcommand that loads a model checks `--model_name_or_path` first (`soft_peft.hub.resolve_model_path`): a
path that is neither a local folder nor on a reachable Hub fails at once, and a Hub id reaches `from_pretrained`."""

from __future__ import annotations

import time

import huggingface_hub
import pytest
import transformers
from example_runs import save_tiny_model

from soft_peft.cli import main as soft_peft_main

UNREACHABLE = "runs/nothere: no such local folder, and the Hub could not be reached (HF_HUB_OFFLINE=1 is set"

COMMANDS = {
    "eval": ["--dataset_name", "data/gsm8k/train_300.jsonl", "--output_dir", "unused"],
    "generate": ["--prompt", "Question: 1+1?"],
    "extract": ["--num_layers", "2", "--output_dir", "unused"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_model_fails_at_once_with_exit_code_2(command, capsys):
    start = time.perf_counter()
    try:
        status = soft_peft_main([command, "--model_name_or_path", "runs/nothere", *COMMANDS[command]])
    except SystemExit as exited:  # argparse-style errors
        status = exited.code
    assert time.perf_counter() - start < 5.0
    assert status == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"soft-peft {command}: error: {UNREACHABLE}"), last_line


def test_a_hub_id_reaches_from_pretrained_unchanged(tmp_path, monkeypatch):
    tiny = save_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kwargs: None)
    calls = []

    def recording(auto_class):
        load = auto_class.from_pretrained  # the bound original

        def from_pretrained(name, *args, **kwargs):
            if name != "HuggingFaceTB/SmolLM2-135M":  # transformers' own inner calls, on the stand-in folder
                return load(name, *args, **kwargs)
            calls.append((auto_class.__name__, name, args, kwargs))
            return load(tiny, *args, **kwargs)

        return from_pretrained

    for auto_class in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto_class, "from_pretrained", recording(auto_class))
    argv = ["--model_name_or_path", "HuggingFaceTB/SmolLM2-135M", "--num_layers", "2"]
    assert soft_peft_main(["extract", *argv, "--output_dir", str(tmp_path / "out")]) == 0
    # Each with `trust_remote_code=False`: never transformers' `[y/N]` prompt, as soft-peft runs no remote code
    no_remote = {"trust_remote_code": False}
    assert calls == [
        ("AutoConfig", "HuggingFaceTB/SmolLM2-135M", (), no_remote),  # the flags are checked against it before loading
        ("AutoTokenizer", "HuggingFaceTB/SmolLM2-135M", (), no_remote),  # a draft model needs it: checked before
        ("AutoModelForCausalLM", "HuggingFaceTB/SmolLM2-135M", (), {"dtype": "auto", **no_remote}),  # its own dtype
    ]
