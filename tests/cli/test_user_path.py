"""What a user who installed the wheel meets on the README's commands: `soft-peft eval` without the `eval` extra says
how to get it in one line."""

from __future__ import annotations

import sys

from soft_peft.cli import main as soft_peft_main


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
