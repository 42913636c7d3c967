"""The shipped recipes parse with the examples' parser, name files that exist, and carry their launch command; the
memory estimate in recipes/README.md counts parameters like transformers does."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
import yaml
from example_runs import EXAMPLES, RECIPES, ROOT

from soft_peft.cli.train_args import parse_args

TRAINING_RECIPES = sorted(RECIPES.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def header(path) -> str:
    """The leading comment block of a YAML file."""
    lines = path.read_text().splitlines()
    end = next(index for index, line in enumerate(lines) if not line.startswith("#"))
    return "\n".join(lines[:end])


def test_every_launch_config_is_shipped():
    assert {p.stem for p in ACCELERATE_CONFIGS} == {
        "single",
        "ddp",
        "zero3",
        "zero3_offload",
        "zero3_cpu",
        "fsdp2",
        "zero3_multinode",
        "fsdp2_multinode",
    }


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: p.stem)
def test_training_recipe_parses_and_states_its_command(recipe):
    # GPU recipes ask for bf16, which this CPU machine refuses: override it, as a command line would
    script_args, training_args, model_args = parse_args(["--config", str(recipe), "--bf16", "false"])
    assert script_args.dataset_name and model_args.model_name_or_path
    text = header(recipe)
    assert f"--config recipes/{recipe.name}" in text or "soft-peft train --config" in text
    assert "accelerate launch" in text or "soft-peft train" in text
    # An installed soft-peft has no clone paths: its command comes first, by the recipe's name
    first_command = next(
        line
        for line in text.splitlines()
        if re.match(r"#\s+(soft-peft (train|recipes)|accelerate launch|python) ", line)
    )
    assert f"soft-peft train --config {recipe.stem}" in first_command or "soft-peft recipes path" in first_command
    if "soft-peft recipes path" in first_command:
        assert f"-m soft_peft.cli train --config {recipe.stem}" in text


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads_and_states_its_command(config):
    settings = yaml.safe_load(config.read_text())
    assert settings["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
    assert f"accelerate launch --config_file recipes/accelerate/{config.name}" in header(config)
    if settings["num_machines"] == 1:  # and the installed form, by name
        assert f'--config_file "$(soft-peft recipes path accelerate/{config.stem})"' in header(config)
    if settings["distributed_type"] == "DEEPSPEED":
        assert settings["deepspeed_config"]["zero_stage"] == 3
        assert settings["deepspeed_config"]["zero3_save_16bit_model"]  # a gathered, vanilla final checkpoint
    if settings["distributed_type"] == "FSDP":
        assert settings["fsdp_config"]["fsdp_version"] == 2
        assert settings["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if settings["num_machines"] > 1:  # one launch per node: the header says which flags differ between them
        assert "--machine_rank" in header(config) and "--main_process_ip" in header(config)
        if "deepspeed_config" in settings:  # torchrun on every node: no pdsh, hostfile or ssh between nodes
            assert settings["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


def test_every_training_recipe_is_listed_in_the_recipes_readme():
    text = (RECIPES / "README.md").read_text()
    assert [recipe.name for recipe in TRAINING_RECIPES if f"`{recipe.name}`" not in text] == []


def test_files_named_in_docs_exist():
    documents = [*EXAMPLES.glob("*.py"), *TRAINING_RECIPES, *ACCELERATE_CONFIGS, RECIPES / "README.md"]
    documents += [*RECIPES.glob("slurm/*.sbatch")]
    documents += [ROOT / "README.md", ROOT / "data" / "README.md"]  # data/: what a clone ships for offline use
    named = re.compile(r"(?<![\w/])(?:examples|recipes|data)/[\w/.-]+\.(?:py|yaml|jsonl|sbatch)")
    for document in documents:
        for name in named.findall(document.read_text()):
            assert (ROOT / name).exists(), f"{document.name} names {name}, which does not exist"


def test_memory_estimate_counts_parameters_like_transformers():
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = importlib.util.spec_from_file_location("memory_estimate", RECIPES / "memory_estimate.py")
    estimate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(estimate)
    shapes = [estimate.LLAMA2_13B, {**estimate.LLAMA2_13B, "num_key_value_heads": 8, "tie_word_embeddings": True}]
    for shape in shapes:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
        assert estimate.parameter_count(shape) == sum(p.numel() for p in model.parameters())
    assert estimate.parameter_count(estimate.LLAMA2_13B) == 13_015_864_320  # LLaMA-2 13B
