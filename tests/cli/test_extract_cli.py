"""`soft-peft extract`: what it writes reloads in plain transformers as exactly that exit (full model and LoRA
adapter), with its tokenizer, model card and serving invocations; what it refuses, before loading, losing nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard, RepoUrl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from soft_peft.checkpoints import save_adapter_exit_layers, save_run_record
from soft_peft.cli import main as soft_peft_main
from soft_peft.exit_head import find_exit_head

INPUT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def exit_logits(model, layer: int) -> torch.Tensor:
    """Exit ``layer`` of ``model``: hidden_states[layer] through its own final norm and head."""
    with torch.no_grad():
        hidden = model(INPUT_IDS, output_hidden_states=True).hidden_states[layer]
        return find_exit_head(model).logits_from_raw(hidden)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its content's hash: what "nothing on disk was lost" compares."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def full_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "full"
    model = tiny_model("llama")
    model.config.soft_exit_layers = [2, 4]
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, full_model) -> Path:
    """A LoRA adapter (non-zero, so merging changes the logits) on ``full_model``, with its exits and tokenizer."""
    folder = tmp_path_factory.mktemp("models") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(full_model)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)
    save_adapter_exit_layers(folder, [2, 4])
    tiny_tokenizer().save_pretrained(folder)
    return folder


def extract(*argv: str) -> int:
    return soft_peft_main(["extract", *argv])


def test_full_model_exit_reloads_with_the_exit_logits_tokenizer_card_and_invocations(full_model, tmp_path, capsys):
    output = tmp_path / "sub"
    assert extract("--model_name_or_path", str(full_model), "--num_layers", "2", "--output_dir", str(output)) == 0
    printed = capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.soft_exit_layers == [2]
    source = AutoModelForCausalLM.from_pretrained(full_model).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, exit_logits(source, 2), rtol=0, atol=0)
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= {p.name for p in output.iterdir()}
    card = (output / "README.md").read_text()
    assert "| depth | 2 decoder layers (the first 2 of 4) |" in card
    assert f"| parameters | {reloaded.num_parameters():,} (" in card and "| SoFT exits trained | 2, 4 |" in card
    assert "Saved the 2-layer sub-model" in printed and f"to {output}" in printed
    assert "assistant_model=assistant" in printed and f"from_pretrained({str(output)!r})" in printed
    assert '"method": "draft_model"' in printed and "--speculative-algorithm STANDALONE" in printed
    assert f"--speculative-draft-model-path {output}" in printed


HUB_BASE = "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize(
    "recorded, shown, metadata",
    [("/data/models/smollm2-base", "smollm2-base", None), (HUB_BASE, HUB_BASE, HUB_BASE)],
)
def test_the_card_names_the_base_model_from_the_run_record(full_model, tmp_path, recorded, shown, metadata):
    """A model SoFTTrainer saved carries soft_peft_run.json: its base model reaches the sub-model's card (a local
    base by folder name only, and only a Hub id in the metadata)."""
    source, output = tmp_path / "run", tmp_path / "sub"
    shutil.copytree(full_model, source)
    save_run_record(source, base_model=recorded, base_model_config={}, exit_layers=[2, 4], exit_loss_weights=[1, 1])
    assert extract("--model_name_or_path", str(source), "--num_layers", "2", "--output_dir", str(output)) == 0
    card = ModelCard.load(output / "README.md")
    assert f"| base model | `{shown}` |" in card.text and card.data.base_model == metadata
    assert "/data/models" not in card.text


def test_adapter_is_merged_and_reloads_without_peft(full_model, adapter, tmp_path, capsys):
    output = tmp_path / "sub"
    assert extract("--model_name_or_path", str(adapter), "--num_layers", "2", "--output_dir", str(output)) == 0
    assert "Merging the adapter" in capsys.readouterr().err
    assert not (output / "adapter_config.json").exists()
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert not [key for key in keys if "lora_" in key or "base_layer" in key], keys
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    assert reloaded.config.soft_exit_layers == [2]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(full_model), adapter).eval()
    with torch.no_grad():
        got = reloaded(INPUT_IDS).logits
        torch.testing.assert_close(got, exit_logits(adapted, 2), rtol=1e-5, atol=1e-5)
        # The adapter was applied: the base model's exit differs
        base_exit = exit_logits(AutoModelForCausalLM.from_pretrained(full_model).eval(), 2)
    assert (got - base_exit).abs().max() > 1e-2
    card = (output / "README.md").read_text()
    # Local folders by name only: a pushed card must not carry this machine's paths
    assert f"base model | `{full_model.name}`" in card and f"extracted from | `{adapter.name}`" in card
    described = card.split("## Serving")[0]  # the serving snippets name the local folders on purpose, to be run here
    assert str(full_model) not in described and str(adapter) not in described


def _refusal(argv: list[str], capsys) -> str:
    """Run extract expecting exit status 2 before any model loads; returns stderr."""
    with mock.patch("transformers.AutoModelForCausalLM.from_pretrained", side_effect=AssertionError("loaded")) as load:
        with pytest.raises(SystemExit) as exited:
            extract(*argv)
    assert exited.value.code == 2 and load.call_count == 0
    return capsys.readouterr().err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
@pytest.mark.parametrize("target", ["source", "adapter", "adapter_base", "parent"])
def test_refuses_to_write_over_the_model_it_reads(full_model, adapter, capsys, target, overwrite):
    model = adapter if target.startswith("adapter") else full_model
    output = {"source": full_model, "adapter": adapter, "adapter_base": full_model, "parent": full_model.parent}
    before = snapshot(full_model.parent), snapshot(adapter.parent)
    err = _refusal(
        ["--model_name_or_path", str(model), "--num_layers", "2", "--output_dir", str(output[target]), *overwrite],
        capsys,
    )
    what = "contains" if target == "parent" else "is"
    assert f"--output_dir {output[target]} {what} the model being read" in err
    assert "would destroy it (even with --overwrite_output_dir). Choose another --output_dir." in err
    assert (snapshot(full_model.parent), snapshot(adapter.parent)) == before


def test_refuses_a_non_empty_folder_and_keeps_it(full_model, tmp_path, capsys):
    output = tmp_path / "old"
    output.mkdir()
    (output / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (output / "notes.txt").write_text("mine")
    before = snapshot(output)
    err = _refusal(["--model_name_or_path", str(full_model), "--num_layers", "2", "--output_dir", str(output)], capsys)
    assert f"--output_dir {output} is not empty (it holds adapter_config.json, notes.txt)" in err
    assert "Pass --overwrite_output_dir to replace its contents" in err
    assert snapshot(output) == before


def test_refuses_a_file_as_output(full_model, tmp_path, capsys):
    output = tmp_path / "file"
    output.write_text("x")
    err = _refusal(["--model_name_or_path", str(full_model), "--num_layers", "2", "--output_dir", str(output)], capsys)
    assert "is a file, not a folder" in err and output.read_text() == "x"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_layers", "5"], "--num_layers 5: must be in 1..4"),
        (["--num_layers", "2,2"], "--num_layers 2,2: each depth once"),
        (["--num_layers", "2", "--hub_model_id", "me/x"], "need --push_to_hub"),
        (["--num_layers", "2", "--push_to_hub", "--hub_model_id", "a/b/c"], "'a/b/c' is not a Hub repository id"),
        (["--num_layers", "2", "--eval_results", "/no/such/metrics.json"], "--eval_results /no/such/metrics.json"),
    ],
)
def test_refuses_bad_flags_before_loading(full_model, tmp_path, capsys, flags, message):
    err = _refusal(["--model_name_or_path", str(full_model), "--output_dir", str(tmp_path / "o"), *flags], capsys)
    assert message in err and not (tmp_path / "o").exists()


def test_overwrite_replaces_a_stale_adapter_folder(full_model, tmp_path):
    output = tmp_path / "old"
    output.mkdir()
    (output / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (output / "adapter_model.safetensors").write_bytes(b"stale")
    argv = ["--model_name_or_path", str(full_model), "--num_layers", "2", "--output_dir", str(output)]
    assert extract(*argv, "--overwrite_output_dir") == 0
    assert not (output / "adapter_config.json").exists() and not (output / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no staging folder left
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    with torch.no_grad():
        expected = exit_logits(AutoModelForCausalLM.from_pretrained(full_model).eval(), 2)
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, expected, rtol=0, atol=0)


def test_a_failed_save_leaves_the_old_folder_as_it_was(full_model, tmp_path):
    output = tmp_path / "old"
    shutil.copytree(full_model, output)  # an earlier export: what --overwrite_output_dir may replace
    (output / "notes.txt").write_text("mine")
    before = snapshot(output)
    argv = ["--model_name_or_path", str(full_model), "--num_layers", "2", "--output_dir", str(output)]
    with mock.patch("transformers.PreTrainedModel.save_pretrained", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            extract(*argv, "--overwrite_output_dir")
    assert snapshot(output) == before and sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_family_with_eval_card_and_push_to_hub(full_model, tmp_path, capsys):
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.parent.mkdir()
    exits = {"2": {"loss": 2.5, "perplexity": 12.18, "note": "x"}, "4": {"loss": 2.0, "perplexity": 7.39}}
    metrics.write_text(json.dumps({"model": str(full_model), "exits": exits}))
    output = tmp_path / "family"
    argv = ["--model_name_or_path", str(full_model), "--num_layers", "4,2", "--output_dir", str(output)]
    argv += ["--eval_results", str(metrics.parent), "--license", "apache-2.0"]
    argv += ["--push_to_hub", "--hub_model_id", "me/tiny-soft", "--hub_private_repo", "--hub_token", "hf_x"]
    with mock.patch("huggingface_hub.HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.side_effect = lambda repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}")
        assert extract(*argv) == 0
    api_class.assert_called_once_with(token="hf_x")
    assert api.create_repo.call_args_list == [
        mock.call("me/tiny-soft-2-layers", private=True, exist_ok=True, repo_type="model"),
        mock.call("me/tiny-soft-4-layers", private=True, exist_ok=True, repo_type="model"),
    ]
    assert api.upload_folder.call_args_list == [
        mock.call(
            repo_id=f"me/tiny-soft-{k}-layers",
            folder_path=str(output / f"{k}-layers"),
            commit_message=f"Upload {k}-layers with soft-peft",
            repo_type="model",
        )
        for k in (2, 4)
    ]
    printed = capsys.readouterr().out
    assert "Pushed to https://huggingface.co/me/tiny-soft-2-layers, https://huggingface.co/me/tiny-soft-4-layers" in (
        printed
    )
    for k in (2, 4):
        assert AutoModelForCausalLM.from_pretrained(output / f"{k}-layers").config.num_hidden_layers == k
    card = (output / "2-layers" / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card
    assert "| exit | loss | perplexity |" in card and "| **2** (this model) | 2.5 | 12.18 |" in card
    assert "| 4 | 2 | 7.39 |" in card and "note" not in card
    assert "'model': 'me/tiny-soft-2-layers'" in card  # the card's invocations name the pushed draft


def test_an_export_prints_no_deepspeed_accelerator_line(full_model, tmp_path):
    """`save_pretrained` imports DeepSpeed (when installed) through accelerate, which warned that it fell back to the
    CPU: noise for an export. A fresh process, since DeepSpeed warns only once per process."""
    pytest.importorskip("deepspeed")
    command = [sys.executable, "-m", "soft_peft.cli", "extract", "--model_name_or_path", str(full_model)]
    done = subprocess.run(
        [*command, "--num_layers", "2", "--output_dir", str(tmp_path / "sub")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Saved the 2-layer sub-model" in done.stdout
    assert "Setting accelerator" not in done.stderr + done.stdout
