"""The studies read GSM8K from the Hub by default (`openai/gsm8k`, configuration `main`) and a local copy when given
one: the loaders are patched (no Hub here) and the exact calls asserted."""

from __future__ import annotations

import argparse

import decode_harness
import quality_study
import replicate
from datasets import Dataset
from example_runs import gsm8k_rows, write_jsonl

import soft_peft.data


def raw_rows(count: int = 12) -> Dataset:
    return Dataset.from_list(gsm8k_rows(count))


def prompt_completion_rows(count: int = 210) -> Dataset:
    return Dataset.from_list(
        [{"prompt": f"Question {i}\nAnswer: ", "completion": f"{i} #### {i}"} for i in range(count)]
    )


def test_the_defaults_are_the_hub_dataset():
    assert quality_study.DATA == replicate.DATA == decode_harness.DEFAULT_DATA == "openai/gsm8k"


def test_quality_study_splits_the_hub_dataset_with_its_configuration(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(soft_peft.data, "load_raw_dataset", lambda *a, **k: calls.append((a, k)) or raw_rows())
    args = argparse.Namespace(data="openai/gsm8k", cache_dir=str(tmp_path), held_out=4)
    train, held_out = quality_study._prepare_split(args)
    assert calls == [(("openai/gsm8k",), {"config_name": "main"})]
    assert (len(train.read_text().splitlines()), len(held_out.read_text().splitlines())) == (8, 4)
    assert '"source": "openai/gsm8k"' in (tmp_path / "data" / "split.json").read_text()


def test_quality_study_reads_a_local_copy_without_a_configuration(tmp_path, monkeypatch):
    local = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(12))
    calls = []
    monkeypatch.setattr(soft_peft.data, "load_raw_dataset", lambda *a, **k: calls.append((a, k)) or raw_rows())
    quality_study._prepare_split(argparse.Namespace(data=str(local), cache_dir=str(tmp_path / "cache"), held_out=4))
    assert calls == [((str(local),), {"config_name": None})]


def test_decode_benchmarks_and_replicate_load_the_hub_dataset_with_its_configuration(tmp_path, monkeypatch):
    calls = []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        return prompt_completion_rows()

    monkeypatch.setattr(decode_harness, "load_prompt_completion", load)
    prompts, references, calibration = decode_harness.gsm8k_benchmark_data("openai/gsm8k", 2)
    assert (len(prompts), len(references), len(calibration)) == (2, 2, 10)
    monkeypatch.setattr(soft_peft.data, "load_prompt_completion", load)
    train, held_out = replicate.load_split()
    assert (len(train), len(held_out)) == (10, 200)
    local = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(3))
    replicate.load_split(str(local))
    assert calls == [
        (("openai/gsm8k", "gsm8k"), {"config_name": "main"}),
        (("openai/gsm8k", "gsm8k"), {"config_name": "main"}),
        ((str(local), "gsm8k"), {"config_name": None}),
    ]
