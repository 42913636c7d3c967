"""`benchmarks.serve_vllm_grid` without vLLM: a stand-in engine that drafts and accepts by a fixed rule, to check the
batching, the per-batch counters, the resume and the table against numbers worked out by hand."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field

import pytest

from benchmarks import serve_vllm_grid as grid


@dataclass
class Metric:
    name: str
    value: int = 0
    values: list[int] = field(default_factory=list)


class FakeLLM:
    """Each prompt decodes 4 tokens; with a draft, every generate call adds 2 drafts of k tokens, 3 accepted."""

    started: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.drafts = self.accepted = 0
        FakeLLM.started.append(kwargs)

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(len(prompts))
        config = self.kwargs["speculative_config"]
        if config:
            self.drafts, self.accepted = self.drafts + 2, self.accepted + 3
        output = types.SimpleNamespace
        return [output(outputs=[output(token_ids=[len(p), 1, 2, 3][: params.max_tokens])]) for p in prompts]

    def get_metrics(self):
        k = self.kwargs["speculative_config"]["num_speculative_tokens"]
        return [
            Metric("vllm:spec_decode_num_drafts", self.drafts),
            Metric("vllm:spec_decode_num_draft_tokens", self.drafts * k),
            Metric("vllm:spec_decode_num_accepted_tokens", self.accepted),
            Metric("vllm:spec_decode_num_accepted_tokens_per_pos", values=[self.accepted, 0]),
        ]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__version__ = "0.0-fake"
    module.LLM = FakeLLM
    module.SamplingParams = lambda temperature, max_tokens: types.SimpleNamespace(max_tokens=max_tokens)
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.started = []
    return module


def test_the_grid_measures_each_engine_per_batch_size_resumes_and_tabulates(tmp_path, fake_vllm, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(4)))
    drafts = []
    for layers in (9, 15):
        folder = tmp_path / f"exit{layers}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
        drafts.append(str(folder))
    output = tmp_path / "grid.json"
    argv = ["--model", "full", "--drafts", ",".join(drafts), "--ks", "2,4", "--batch_sizes", "1,2"]
    argv += ["--num_prompts", "4", "--data", str(rows), "--json", str(output), "--markdown", str(tmp_path / "t.md")]
    assert grid.main(argv) == 0
    results = json.loads(output.read_text())
    assert list(results["engines"]) == ["none", "9:2", "9:4", "15:2", "15:4"]
    assert [s["max_num_seqs"] for s in FakeLLM.started] == [2] * 5
    assert FakeLLM.started[2]["speculative_config"] == {"method": "draft_model", "model": drafts[0],
                                                       "num_speculative_tokens": 4}  # fmt: skip
    # batch 1: 4 generate calls (8 drafts, 12 accepted); batch 2: 2 calls (4 drafts, 6 accepted); counted apart
    one, two = results["engines"]["9:4"]["batches"]["1"], results["engines"]["9:4"]["batches"]["2"]
    assert (one["spec_decode"]["num_drafts"], one["spec_decode"]["num_draft_tokens"]) == (8, 32)
    assert (two["spec_decode"]["num_drafts"], two["spec_decode"]["num_accepted_tokens"]) == (4, 6)
    assert one["spec_decode"]["acceptance_rate"] == 0.375 and two["spec_decode"]["accepted_per_draft"] == 1.5
    assert one["tokens"] == 16 and one["token_ids"] == results["engines"]["none"]["batches"]["1"]["token_ids"]
    table = (tmp_path / "t.md").read_text()
    assert "| none | – | 2 |" in table and "| 15 | 2 | 1 |" in table and table.count("| 4/4 |") == 8

    FakeLLM.started = []
    assert grid.main(argv) == 0  # everything measured: no engine starts again
    assert FakeLLM.started == [] and "5/5 15:4: measured, skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="measured with other settings"):
        grid.main([*argv, "--max_new_tokens", "8"])


def test_the_grid_refuses_a_prompt_count_that_batches_do_not_divide(capsys):
    with pytest.raises(SystemExit):
        grid.parse_args(["--model", "m", "--drafts", "d", "--json", "j", "--num_prompts", "6", "--batch_sizes", "4"])
    assert "--num_prompts 6 must be a multiple of every --batch_sizes [4]" in capsys.readouterr().err
