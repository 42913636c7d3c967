"""`soft-peft recipes` (list, path, copy) and `--config NAME`: the shipped recipes found by name, in a clone from the
repository's `recipes/` (the wheel's copy is tested in tests/test_packaging.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from soft_peft.cli import main as soft_peft_main
from soft_peft.cli.preflight import UsageError
from soft_peft.cli.recipes import recipe_names, recipes_dir, resolve_config
from soft_peft.cli.train_args import parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_a_clone_reads_the_repository_recipes():
    assert recipes_dir() == ROOT / "recipes"
    names = recipe_names()
    assert {p.stem for p in (ROOT / "recipes").glob("*.yaml")} == {n for n in names if "/" not in n}
    assert {f"accelerate/{p.stem}" for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")} == {
        n for n in names if "/" in n
    }


def test_list_names_every_recipe_with_its_summary(capsys):
    assert soft_peft_main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        assert name in out
    assert re.search(
        r"^smollm2_135m_alpaca_cpu +SmolLM2-135M \(30 layers\), Sorted Fine-Tuning on Alpaca on one CPU machine$",
        out,
        re.M,
    )


def test_path_prints_the_shipped_file(capsys):
    assert soft_peft_main(["recipes", "path", "accelerate/zero3"]) == 0
    assert capsys.readouterr().out.strip() == str(ROOT / "recipes" / "accelerate" / "zero3.yaml")
    assert soft_peft_main(["recipes", "path", "smollm2_135m_alpaca_cpu.yaml"]) == 0  # the suffix is optional
    assert capsys.readouterr().out.strip() == str(ROOT / "recipes" / "smollm2_135m_alpaca_cpu.yaml")


def test_copy_writes_the_file_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = ROOT / "recipes" / "smollm2_135m_alpaca_cpu.yaml"
    assert soft_peft_main(["recipes", "copy", "smollm2_135m_alpaca_cpu"]) == 0
    assert (tmp_path / source.name).read_text() == source.read_text()
    (tmp_path / source.name).write_text("edited")
    assert soft_peft_main(["recipes", "copy", "smollm2_135m_alpaca_cpu"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / source.name).read_text() == "edited"
    assert soft_peft_main(["recipes", "copy", "smollm2_135m_alpaca_cpu", "--force"]) == 0
    assert (tmp_path / source.name).read_text() == source.read_text()
    (tmp_path / "configs").mkdir()
    assert soft_peft_main(["recipes", "copy", "accelerate/ddp", "configs"]) == 0  # into a folder
    assert (tmp_path / "configs" / "ddp.yaml").read_text() == (ROOT / "recipes/accelerate/ddp.yaml").read_text()
    assert soft_peft_main(["recipes", "copy", "accelerate/single", "mine.yaml"]) == 0  # to a file name
    assert (tmp_path / "mine.yaml").read_text() == (ROOT / "recipes/accelerate/single.yaml").read_text()


@pytest.mark.parametrize("command", ["path", "copy"])
def test_an_unknown_name_fails_in_one_line(command, capsys):
    assert soft_peft_main(["recipes", command, "smollm2_alpaca"]) == 2
    assert capsys.readouterr().err.strip() == (
        "soft-peft recipes: no shipped recipe 'smollm2_alpaca'; did you mean 'smollm2_135m_alpaca_cpu'? "
        "`soft-peft recipes` lists them."
    )


def test_config_takes_a_file_first_then_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("smollm2_135m_alpaca_cpu") == str(ROOT / "recipes" / "smollm2_135m_alpaca_cpu.yaml")
    (tmp_path / "smollm2_135m_alpaca_cpu").write_text("max_steps: 3\n")  # a local file of that name wins
    assert resolve_config("smollm2_135m_alpaca_cpu") == "smollm2_135m_alpaca_cpu"
    with pytest.raises(FileNotFoundError, match=r"got 'nope'.*Shipped recipes: llama2_13b_alpaca_lora, "):
        resolve_config("nope")


def test_train_parses_a_shipped_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the name, not a relative path, finds it
    script_args, training_args, model_args = parse_args(["--config", "smollm2_135m_alpaca_cpu", "--max_steps", "3"])
    assert (script_args.dataset_name, model_args.model_name_or_path) == (
        "tatsu-lab/alpaca",
        "HuggingFaceTB/SmolLM2-135M",
    )
    assert training_args.max_steps == 3 and training_args.learning_rate == 1e-4  # the override, and the recipe
    with pytest.raises(UsageError, match="no such file or name"):
        parse_args(["--config", "recipes/smollm2_135m_alpaca_cpu.yaml"])  # a clone path, outside the clone


def test_a_closed_pipe_ends_the_listing_without_a_traceback():
    """`soft-peft recipes list | head -1`: the reader leaves early; Python raised BrokenPipeError with a traceback."""
    listing = subprocess.Popen(
        [sys.executable, "-m", "soft_peft.cli", "recipes", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    listing.stdout.close()  # the reader is gone before the first line
    err = listing.stderr.read().decode()
    assert listing.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
