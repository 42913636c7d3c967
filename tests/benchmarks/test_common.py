"""`benchmarks/common.py`: the GSM8K split (the Hub dataset by default, a local copy when given one: the loaders are
patched, no Hub here, and the exact calls asserted), model shapes and their parameter counts, and the parsers."""

from __future__ import annotations

import argparse

import pytest
import torch
from datasets import Dataset
from example_runs import gsm8k_rows, write_jsonl

import soft_peft.data
from benchmarks import common, decode_harness, quality_study


def raw_rows(count: int = 12) -> Dataset:
    return Dataset.from_list(gsm8k_rows(count))


def prompt_completion_rows(count: int = 210) -> Dataset:
    return Dataset.from_list(
        [{"prompt": f"Question {i}\nAnswer: ", "completion": f"{i} #### {i}"} for i in range(count)]
    )


def test_every_data_flag_defaults_to_the_hub_dataset():
    assert quality_study.DATA == common.GSM8K == "openai/gsm8k"
    parser = argparse.ArgumentParser()
    common.add_data_argument(parser)
    assert parser.parse_args([]).data == "openai/gsm8k"


def test_quality_study_splits_the_hub_dataset_with_its_configuration(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(soft_peft.data, "load_raw_dataset", lambda *a, **k: calls.append((a, k)) or raw_rows())
    args = argparse.Namespace(data="openai/gsm8k", cache_dir=str(tmp_path), held_out=4)
    train, held_out = quality_study._prepare_split(args)
    assert calls == [(("openai/gsm8k",), {"config_name": "main"})]
    assert (len(train.read_text().splitlines()), len(held_out.read_text().splitlines())) == (8, 4)
    # The split's record is the one a running study wrote: unchanged, so its data is not written again
    assert (tmp_path / "data" / "split.json").read_text() == '{"source": "openai/gsm8k", "held_out": 4, "seed": 0}'


def test_quality_study_reads_a_local_copy_without_a_configuration(tmp_path, monkeypatch):
    local = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(12))
    calls = []
    monkeypatch.setattr(soft_peft.data, "load_raw_dataset", lambda *a, **k: calls.append((a, k)) or raw_rows())
    quality_study._prepare_split(argparse.Namespace(data=str(local), cache_dir=str(tmp_path / "cache"), held_out=4))
    assert calls == [((str(local),), {"config_name": None})]


def test_the_decoding_benchmarks_split_the_hub_dataset_or_a_local_copy(tmp_path, monkeypatch):
    calls = []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        return prompt_completion_rows()

    monkeypatch.setattr(soft_peft.data, "load_prompt_completion", load)
    prompts, references, calibration = decode_harness.gsm8k_benchmark_data("openai/gsm8k", 2)
    assert (len(prompts), len(references), len(calibration)) == (2, 2, 10)
    local = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(3))
    train, held_out = common.gsm8k_split(str(local))
    assert (len(train), len(held_out)) == (10, 200)
    assert calls == [
        (("openai/gsm8k", "gsm8k"), {"config_name": "main"}),
        ((str(local), "gsm8k"), {"config_name": None}),
    ]


@pytest.mark.parametrize("name", ["tiny", "llama3.2-1b"])
def test_parameter_count_is_the_built_models(name):
    shape = {**common.SHAPES[name], "num_hidden_layers": 2}  # fewer layers: built for real on the CPU
    model = common.random_model(shape, dtype=torch.float32)
    assert common.parameter_count(shape) == sum(p.numel() for p in model.parameters())
    assert model.config.tie_word_embeddings == common.SHAPES[name].get("tie_word_embeddings", False)


def test_parameter_counts_of_the_real_shapes():
    assert common.parameter_count("llama2-13b") == 13_015_864_320  # LLaMA-2 13B
    assert common.parameter_count("llama3-8b") == 8_030_261_248  # Llama-3 8B
    assert common.parameter_count("llama3.2-1b") == 1_235_814_400  # Llama-3.2 1B (tied head)


def test_random_models_are_reproducible_and_built_on_the_device():
    first, second = common.random_model("tiny"), common.random_model("tiny")
    assert first.dtype == torch.bfloat16 and first.device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_parsers():
    assert common.parse_ints("9,12,") == [9, 12] and common.parse_floats("0.9, 0.5") == [0.9, 0.5]
    assert common.parse_variant(" a = --exit_rotation 2 ") == ("a", "--exit_rotation 2")
    assert common.parse_variant("plain=") == ("plain", "")
    for bad in ("bad", "=--exit_rotation 2", "x=exit_rotation 2", "sft=--exit_rotation 2"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected NAME="):
            common.parse_variant(bad, reserved=("sft",))


def test_timed_counts_the_calls_wall_time(monkeypatch):
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    calls = []
    assert common.timed(lambda x: calls.append(x))(7) == 2.5 and calls == [7]


def test_peak_rss_grows_with_an_allocation():
    before = common.peak_rss_gb()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    assert common.peak_rss_gb() >= before and block.sum() > 0
    assert common.peak_rss_gb() > 0.01
