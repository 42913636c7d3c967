"""What a user who installed the wheel meets on the README's commands: a mistyped recipe name gets the near name, the
recipe list gives each recipe's whole first phrase, and `soft-peft eval` without the `eval` extra says how to get it
in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from soft_peft.cli import main as soft_peft_main
from soft_peft.cli.recipes import recipe_names, resolve_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("typed", "meant"),
    [("smollm2_135m_alpca_cpu", "smollm2_135m_alpaca_cpu"), ("accelerate/zero", "accelerate/zero3")],
)
@pytest.mark.parametrize("command", ["path", "copy"])
def test_a_mistyped_name_gets_the_near_name(command, typed, meant, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert soft_peft_main(["recipes", command, typed]) == 2
    err = capsys.readouterr().err
    assert f"no shipped recipe {typed!r}; did you mean {meant!r}?" in err
    assert list(tmp_path.iterdir()) == []  # nothing copied


def test_a_mistyped_config_gets_the_near_name():
    with pytest.raises(FileNotFoundError, match=r"Did you mean 'smollm2_135m_alpaca_cpu'\?"):
        resolve_config("smollm2_135m_alpaca_cpuu")


def test_an_unrelated_name_gets_no_guess(capsys):
    assert soft_peft_main(["recipes", "path", "zzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err
    with pytest.raises(FileNotFoundError) as error:
        resolve_config("zzz")
    assert "Did you mean" not in str(error.value)


def test_the_list_gives_each_recipes_whole_first_phrase(capsys):
    """A first phrase that wraps onto the comment's next line is listed whole, not cut at the line end."""
    assert soft_peft_main(["recipes"]) == 0
    listed = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()[: len(recipe_names())])
    assert listed["smollm2_135m_gsm8k_recommended"] == (
        "SmolLM2-135M-Instruct (30 layers, tied head), Sorted Fine-Tuning on GSM8K on one CPU, with the settings the "
        "quality study recommends (docs/results.md)"
    )
    for name, summary in listed.items():
        assert not summary.endswith((",", " the", " in", " of")), f"{name}: summary cut mid-phrase: {summary!r}"


def test_eval_without_matplotlib_says_which_extra_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError, as when missing
    code = soft_peft_main(
        ["eval", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "data.jsonl")]
        + ["--output_dir", str(tmp_path / "out")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("soft-peft eval: error: ") and "\n" not in err
    assert 'pip install "soft-peft[eval]"' in err
    assert not (tmp_path / "out").exists()


def test_copy_into_a_folder_that_is_not_there_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    """`copy NAME missing/` wrote a file called `missing` (Path drops the slash), `copy NAME missing/x.yaml` raised a
    traceback: both now refuse, naming the folder, and write nothing."""
    monkeypatch.chdir(tmp_path)
    for dest in ("missing/", "missing/mine.yaml"):
        assert soft_peft_main(["recipes", "copy", "accelerate/ddp", dest]) == 2
        assert capsys.readouterr().err.strip() == "soft-peft recipes: no folder missing to copy into; create it first."
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "configs").mkdir()
    assert soft_peft_main(["recipes", "copy", "accelerate/ddp", "configs/"]) == 0  # an existing folder, with a slash
    assert (tmp_path / "configs" / "ddp.yaml").read_text() == (ROOT / "recipes/accelerate/ddp.yaml").read_text()


def test_eval_refuses_an_output_dir_that_is_a_file_before_evaluating(tmp_path, monkeypatch, capsys):
    """The outputs are written after the whole evaluation: a file in the way lost it all, with a traceback."""
    import soft_peft.evaluation.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    # `soft-peft eval` imports it when it runs (its --help imports nothing heavy), so patch it where it lives
    monkeypatch.setattr(pipeline, "run_evaluation", never)
    (tmp_path / "taken").write_text("")
    code = soft_peft_main(
        ["eval", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "data.jsonl")]
        + ["--output_dir", str(tmp_path / "taken" / "eval")]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"soft-peft eval: error: --output_dir {tmp_path / 'taken' / 'eval'}: {tmp_path / 'taken'} is a file, not a "
        "folder; choose another folder."
    )
