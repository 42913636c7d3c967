"""`soft-peft eval` end to end on tiny saved models: the three outputs, comparison, generation, and clear errors."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from soft_peft.cli import main as soft_peft_main
from soft_peft.exits import record_exit_layers


def _save(folder, seed: int, exits=None):
    model, tokenizer = tiny_model("llama", seed=seed), tiny_tokenizer()
    if exits is not None:
        record_exit_layers(model, exits)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    return {"soft": _save(root / "soft", 0, [2, 4]), "plain": _save(root / "plain", 1)}


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)]
    return _write_jsonl(tmp_path_factory.mktemp("data") / "gsm8k.jsonl", rows)


def test_eval_writes_metrics_report_and_plots(models, gsm8k_file, tmp_path):
    out = tmp_path / "out"
    code = soft_peft_main(
        ["eval", "--model_name_or_path", models["soft"], "--dataset_name", gsm8k_file]
        + ["--output_dir", str(out), "--max_samples", "8", "--no_progress"]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["exits"], key=int) == ["2", "4"]  # the recorded exits
    for values in metrics["exits"].values():
        assert values["perplexity"] == pytest.approx(2.718281828459045 ** values["loss"], rel=1e-9)
        assert 0.0 <= values["token_accuracy"] <= 1.0
    assert metrics["exits"]["4"]["kl_to_last"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["settings"]["num_examples"] == 8
    assert metrics["settings"]["dataset_format"] == "gsm8k"
    # The evaluated exits, resolved; `exit_layers` names only the exits a model was trained with
    assert metrics["settings"]["exits"] == [2, 4] and "exit_layers" not in metrics["settings"]
    report = (out / "report.md").read_text()
    assert "| exit | loss | perplexity | token_accuracy" in report
    for name in ("exit_curves.png", "similarity_kl.png", "similarity_cosine.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_compare_generate_and_judge(models, gsm8k_file, tmp_path):
    out = tmp_path / "cmp"
    code = soft_peft_main(
        ["eval", "--model_name_or_path", models["soft"], "--compare_to", models["plain"], "--dataset_name"]
        + [gsm8k_file, "--output_dir", str(out), "--max_samples", "3", "--generate", "--max_new_tokens", "4"]
        + ["--judge_model", models["plain"], "--no_progress"]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The model without recorded exits uses the other model's
    assert sorted(metrics["compare_exits"], key=int) == ["2", "4"]
    assert metrics["settings"]["exits"] == [2, 4] and metrics["settings"]["compare_exits"] == [2, 4]
    exit_2 = metrics["exits"]["2"]
    assert {"kl_to_other_last", "cosine_to_other_last", "gsm8k_accuracy", "ms_per_token"} <= set(exit_2)
    assert exit_2["num_generated"] == 3
    pairs = metrics["similarity"]["pairs"]
    assert len(pairs) == 4  # soft vs soft, soft vs plain, plain vs soft, plain vs plain
    for judged in metrics["judge"].values():
        assert judged["wins"] + judged["losses"] + judged["ties"] == 3


def test_text_and_messages_datasets(models, tmp_path):
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}, {"text": "abc"}])
    messages = _write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}],
    )
    for data in (text, messages):
        out = tmp_path / f"out-{len(data)}"
        assert (
            soft_peft_main(
                [
                    "eval",
                    "--model_name_or_path",
                    models["soft"],
                    "--dataset_name",
                    data,
                    "--output_dir",
                    str(out),
                    "--no_progress",
                ]
            )
            == 0
        )
        assert (out / "metrics.json").exists()


@pytest.mark.parametrize(
    ("extra", "rows", "message"),
    [
        (["--model", "plain"], None, "records no SoFT exits"),
        (["--model", "plain"], None, "Choose the exits: --exits default"),
        (["--exits", "2,9"], None, "exits has [9] outside 1..4"),
        ([], [{"foo": 1}], "cannot tell the dataset format"),
        ([], [{"question": "q"}], "cannot tell the dataset format"),
        ([], [], "empty"),
        (["--dataset_format", "text"], None, "a 'text' dataset needs columns ['text']"),
        (["--dataset_format", "alpaca"], None, "Alpaca dataset needs columns ['instruction', 'output']"),
    ],
)
def test_bad_input_gives_clear_errors(models, gsm8k_file, tmp_path, capsys, extra, rows, message):
    model = models["plain"] if extra[:2] == ["--model", "plain"] else models["soft"]
    extra = [] if extra[:2] == ["--model", "plain"] else extra
    data = gsm8k_file if rows is None else _write_jsonl(tmp_path / "bad.jsonl", rows)
    if rows == []:
        data = str(tmp_path / "empty.jsonl")
        (tmp_path / "empty.jsonl").write_text("")
    code = soft_peft_main(
        ["eval", "--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(tmp_path / "o")] + extra
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_default_keyword_evaluates_every_fourth_layer(models, gsm8k_file, tmp_path):
    out = tmp_path / "default"
    assert (
        soft_peft_main(
            [
                "eval",
                "--model_name_or_path",
                models["plain"],
                "--dataset_name",
                gsm8k_file,
                "--output_dir",
                str(out),
                "--exits",
                "default",
                "--max_samples",
                "2",
                "--no_progress",
            ]
        )
        == 0
    )
    assert list(json.loads((out / "metrics.json").read_text())["exits"]) == ["4"]  # 4 layers: only layer 4
