"""`soft-peft generate` and `soft-peft extract` on a saved tiny model."""

import json

import pytest
from tiny_models import NUM_LAYERS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_peft import dynamic_generate, extract_submodel
from soft_peft.cli import main as soft_peft_main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama")
    model.config.soft_exit_layers = [2, 4]
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "mode", [["--draft_exit", "2"], ["--thresholds", "0.5", "--exits", "2"], ["--num_layers", "2"], []]
)
def test_generate_prints_text_and_stats(saved_model, capsys, mode):
    """The printed text is the decoder's output (greedy `generate`'s for the exact modes) and the stats are its own."""
    status = soft_peft_main(
        ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "5", *mode]
    )
    assert status == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    stats = json.loads(stats)
    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    input_ids = tokenizer("hello", return_tensors="pt").input_ids
    if "--thresholds" in mode:  # early exits change the output: compare with the library call
        out = dynamic_generate(model, input_ids, [2], 0.5, 5)
        sequences = out.sequences
        assert stats["exits_taken"] == out.stats.exits_taken.tolist() and "exit_layers" not in stats
        assert stats["average_depth"] == out.stats.average_depth and stats["new_tokens"] == 5
    else:
        if "--num_layers" in mode:
            model = extract_submodel(model, 2)
        sequences = model.generate(input_ids, do_sample=False, max_new_tokens=5)
        if "--draft_exit" in mode:
            assert stats["draft_exit"] == 2 and stats["new_tokens"] == sequences.shape[1] - input_ids.shape[1]
            assert stats["cycles"] > 0 and stats["layer_forwards"][0] >= stats["layer_forwards"][-1] > 0
        else:
            assert stats == {"num_layers": 2 if mode else NUM_LAYERS}
    assert text == tokenizer.decode(sequences[0, input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("mode", [["--draft_exit", "1"], ["--thresholds", "0.05", "--exits", "1,2"]])
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_generate_with_vocab_texts_prints_the_same_text(saved_model, tmp_path, capsys, mode, suffix):
    texts = tmp_path / f"texts{suffix}"
    rows = [{"instruction": "say hello", "output": "hello there"}, {"output": "lo and behold", "id": 3}]
    lines = [json.dumps(row) for row in rows] if suffix == ".jsonl" else ["hello there", "lo and behold"]
    texts.write_text("\n".join(lines) + "\n")
    base = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "8", *mode]
    assert soft_peft_main(base) == 0
    plain_text = capsys.readouterr().out.rsplit("\n", 2)[0]
    assert soft_peft_main([*base, "--vocab_texts", str(texts), "--vocab_size", "5"]) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text == plain_text
    if "--thresholds" in mode:
        assert json.loads(stats)["full_checks"] <= json.loads(stats)["checks"]


def test_generate_vocab_texts_needs_a_decoder(saved_model, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("abc\n")
    argv = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hi", "--vocab_texts", str(texts)]
    with pytest.raises(SystemExit) as exited:
        soft_peft_main(argv)
    assert exited.value.code == 2 and "--vocab_texts needs --draft_exit or --thresholds" in capsys.readouterr().err


def test_generate_with_a_draft_stop_prints_the_same_text(saved_model, capsys):
    base = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "8"]
    assert soft_peft_main([*base, "--draft_exit", "1"]) == 0
    plain_text = capsys.readouterr().out.rsplit("\n", 2)[0]
    assert soft_peft_main([*base, "--draft_exit", "1", "--draft_stop_threshold", "0.02"]) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text == plain_text and "draft_stops" in json.loads(stats)
    argv = [*base, "--draft_exit", "3", "--draft_stop_threshold", "0.02", "--early_draft_exits", "1,2"]
    assert soft_peft_main(argv) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text == plain_text and sum(json.loads(stats)["drafts_by_exit"].values()) == json.loads(stats)["drafted"]


def test_generate_exit_on_subset(saved_model, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("hello there\nlo and behold\n")
    base = ["generate", "--model_name_or_path", str(saved_model), "--prompt", "hello", "--max_new_tokens", "8"]
    argv = [*base, "--thresholds", "0.05", "--exits", "1,2", "--vocab_texts", str(texts), "--exit_on_subset"]
    assert soft_peft_main(argv) == 0
    stats = json.loads(capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[1])
    assert stats["full_checks"] == 0 and len(stats["exits_taken"]) == 8
    with pytest.raises(SystemExit) as exited:
        soft_peft_main([*base, "--thresholds", "0.05", "--exit_on_subset"])
    assert exited.value.code == 2 and "--exit_on_subset needs" in capsys.readouterr().err


def test_generate_rejects_a_bad_draft_exit(saved_model, capsys):
    # More bad values, all checked before loading, in tests/cli/test_generate_cli.py
    with pytest.raises(SystemExit) as exited:
        soft_peft_main(["generate", "--model_name_or_path", str(saved_model), "--prompt", "hi", "--draft_exit", "4"])
    assert exited.value.code == 2 and "`draft_exit` must be an int in 1..3" in capsys.readouterr().err


def test_extract_saves_a_reloadable_submodel(saved_model, tmp_path, capsys):
    output = tmp_path / "sub"
    status = soft_peft_main(
        ["extract", "--model_name_or_path", str(saved_model), "--num_layers", "2", "--output_dir", str(output)]
    )
    assert status == 0 and "2-layer" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert reloaded.config.num_hidden_layers == 2
