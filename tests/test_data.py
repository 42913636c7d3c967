"""`soft_peft.data`: local files and folders load locally, anything else from the Hub (checked here with a patched
`datasets.load_dataset` and with the real call offline); bad rows fail in one line naming the fix."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset
from example_runs import (  # noqa: E402
    TINY_TRAIN_ARGS,
    alpaca_rows,
    gsm8k_rows,
    run,
    run_example,
    step_logs,
    triviaqa_rows,
    write_jsonl,
)

from soft_peft.data import detect_format, load_prompt_completion, load_raw_dataset, load_trl_dataset, to_trl_format
from soft_peft.data_rows import DatasetFormatError

# Each example's default dataset, exactly as it must reach `datasets.load_dataset`
EXAMPLE_HUB_CALLS = {
    "alpaca": (("tatsu-lab/alpaca", None), {"split": "train"}, alpaca_rows),
    "gsm8k": (("openai/gsm8k", "main"), {"split": "train"}, gsm8k_rows),
    "triviaqa": (("mandarjoshi/trivia_qa", "rc.nocontext"), {"split": "train"}, triviaqa_rows),
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_HUB_CALLS))
def test_example_default_dataset_comes_from_the_hub(name, tiny_model_dir, tmp_path, monkeypatch):
    expected_args, expected_kwargs, rows = EXAMPLE_HUB_CALLS[name]
    calls = []

    def hub_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Dataset.from_list(rows())

    monkeypatch.setattr(datasets, "load_dataset", hub_load_dataset)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_TRAIN_ARGS]
    argv[argv.index("--max_steps") + 1] = "1"
    assert run_example(name, argv, monkeypatch) == 0
    assert calls == [(expected_args, expected_kwargs)]
    assert "exit_2/loss" in step_logs(tmp_path)[1]


def test_offline_hub_dataset_fails_in_one_line(tiny_model_dir, tmp_path):
    # The real `datasets.load_dataset` in a fresh process, offline, with an empty cache (HF_HOME)
    command = ["soft-peft", "train", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path)]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = run([*command, "--dataset_name", "tatsu-lab/alpaca"], check=False, env_overrides=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "soft-peft train: error: tatsu-lab/alpaca: no such local file or folder, and the Hub could not be reached "
        "(HF_HUB_OFFLINE=1 is set and it is not in the datasets cache). Work offline with a local JSON/JSONL file "
        "of the same rows (--dataset_name my_data.jsonl), or load it once online to cache it."
    )


def test_unreachable_hub_says_how_to_work_offline(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(DatasetFormatError) as raised:
        load_raw_dataset("openai/gsm8k", config_name="main")
    assert str(raised.value).startswith(
        "openai/gsm8k: no such local file or folder, and the Hub could not be reached (Couldn't reach 'openai/gsm8k' "
        "on the Hub (ConnectError)). To work offline, pass a local JSON/JSONL file"
    )


def test_a_local_folder_named_like_a_hub_id_loads_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-org" / "alpaca").mkdir(parents=True)
    write_jsonl(tmp_path / "my-org" / "alpaca" / "train.jsonl", alpaca_rows(3))
    assert load_raw_dataset("my-org/alpaca").to_list() == alpaca_rows(3)


def test_a_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub must not be asked"))
    for name in [str(tmp_path / "missing.jsonl"), "data/missing.jsonl", "./alpaca", "a/b/c"]:
        with pytest.raises(DatasetFormatError, match=f"^{name}: no such dataset file or folder.$"):
            load_raw_dataset(name)


def test_shipped_data_loads(gsm8k_path, alpaca_seed_path):
    assert len(load_prompt_completion(str(gsm8k_path), "gsm8k")) == 300
    alpaca = load_prompt_completion(str(alpaca_seed_path), "alpaca")
    assert len(alpaca) == 175 and alpaca[0]["prompt"].endswith("### Response:\n")


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    lines = [json.dumps(row) for row in alpaca_rows(5)]
    lines[2] = lines[2].replace('", "', '" "', 1)  # line 3: a missing comma
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    column = lines[2].index('" "') + 3  # 1-based: where the comma should be, at the next key's quote
    with pytest.raises(DatasetFormatError) as raised:
        load_raw_dataset(str(path))
    assert str(raised.value) == (
        f"{path}, line 3: invalid JSON (Expecting ',' delimiter, column {column}). "
        "Fix that line (JSONL: one JSON object per line)."
    )


def test_malformed_json_document_names_the_line(tmp_path):
    text = json.dumps(alpaca_rows(3), indent=1)
    broken = text.replace('"output": "3"', '"output": 3"')
    assert broken != text
    path = tmp_path / "broken.json"
    path.write_text(broken)
    line = next(number for number, row in enumerate(broken.splitlines(), 1) if '3"' in row and "output" in row)
    with pytest.raises(DatasetFormatError, match=f"^{path}, line {line}: invalid JSON"):
        load_raw_dataset(str(path))


def test_empty_completions(tmp_path):
    rows = gsm8k_rows(4)
    rows[1]["answer"] = ""
    with pytest.warns(UserWarning, match="1 of 4 completions \\(column 'answer'\\) are empty"):
        assert len(load_prompt_completion(str(write_jsonl(tmp_path / "some.jsonl", rows)), "gsm8k")) == 4
    empty = [{**row, "answer": "  "} for row in rows]
    with pytest.raises(DatasetFormatError, match="all 4 completions \\(column 'answer'\\) are empty"):
        load_prompt_completion(str(write_jsonl(tmp_path / "all.jsonl", empty)), "gsm8k")


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}], "messages"),
        ([{"prompt": "2+2=", "completion": " 4"}], "prompt_completion"),
        # The Hub's Alpaca also carries its rendered `text`: its response alone is the completion
        ([{"instruction": "Add.", "input": "", "output": "4", "text": "Add. 4"}], "alpaca"),
        ([{"question": "2+2?", "answer": "4\n#### 4"}], "gsm8k"),
        ([{"question": "Capital of France?", "answer": {"value": "Paris", "aliases": ["Paris"]}}], "triviaqa"),
        ([{"text": "plain language modelling"}], "text"),
    ],
)
def test_detect_format_tells_every_format_by_its_columns(rows, expected):
    assert detect_format(Dataset.from_list(rows)) == expected


def test_to_trl_format_passes_trl_types_through_and_converts_the_papers():
    rows = [{"prompt": "2+2=", "completion": " 4"}]
    dataset, fmt = to_trl_format(Dataset.from_list(rows))
    assert fmt == "prompt_completion" and dataset.to_list() == rows
    converted, fmt = to_trl_format(Dataset.from_list([{"question": "Who?", "answer": {"value": "Ada"}}]))
    assert fmt == "triviaqa" and converted.to_list() == [{"prompt": "Question: Who?\nAnswer:", "completion": " Ada"}]


def test_unknown_or_mismatched_formats_fail_in_one_line():
    with pytest.raises(DatasetFormatError, match="Unknown dataset format 'csv'; expected one of \\['auto'"):
        to_trl_format(Dataset.from_list([{"text": "a"}]), "csv")
    with pytest.raises(DatasetFormatError, match="a 'messages' dataset needs columns \\['messages'\\]"):
        to_trl_format(Dataset.from_list([{"text": "a"}]), "messages", source="x.jsonl")
    with pytest.raises(DatasetFormatError, match="Its columns are 'text' data: pass that format, or 'auto'"):
        to_trl_format(Dataset.from_list([{"text": "a"}]), "messages", source="x.jsonl")
    with pytest.raises(
        DatasetFormatError, match="needs columns \\['text'\\], but \\['text'\\] are missing \\(found \\['a'\\]\\)\\.$"
    ):
        to_trl_format(Dataset.from_list([{"a": 1}]), "text")
    with pytest.raises(DatasetFormatError, match="cannot tell the dataset format from its columns \\['a', 'b'\\]"):
        to_trl_format(Dataset.from_list([{"a": 1, "b": 2}]))
    with pytest.raises(DatasetFormatError, match="expected one of \\['alpaca', 'gsm8k', 'triviaqa'\\]"):
        load_prompt_completion("unused.jsonl", "text")


def test_training_and_evaluation_load_the_same_rows(tmp_path):
    from soft_peft.evaluation.examples import load_eval_dataset

    path = str(write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(6)))
    trained, fmt = load_trl_dataset(path)
    evaluated, eval_fmt = load_eval_dataset(path, max_samples=4)
    assert fmt == eval_fmt == "gsm8k"
    assert evaluated.to_list() == trained.to_list()[:4] == load_prompt_completion(path, "gsm8k").to_list()[:4]
