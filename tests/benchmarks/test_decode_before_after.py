"""`benchmarks/decode_before_after.py`: an earlier revision's decoders imported beside today's, timed interleaved,
their tokens compared."""

import subprocess

import pytest
from decode_before_after import DEFAULT_BEFORE, ROOT, _before_methods, import_revision, ratio_table
from decode_harness import build_methods, run_decode_benchmark
from tiny_models import tiny_model, tiny_tokenizer

import soft_peft


def _has_revision(revision: str) -> bool:
    try:
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", revision], capture_output=True)
    except OSError:  # no git at all
        return False
    return found.returncode == 0


@pytest.mark.skipif(not _has_revision(DEFAULT_BEFORE), reason="no git history with the earlier revision")
def test_earlier_decoders_run_beside_todays_and_agree_token_for_token():
    before = import_revision(DEFAULT_BEFORE, alias="soft_peft_before_test")
    assert before is not soft_peft and before.__file__ != soft_peft.__file__
    model = tiny_model("llama")
    args, kwargs = (4, [2], "adaptive", [2], [1.0, 0.5], [2]), {"modes": ["self-speculative", "dynamic"]}
    after = build_methods(model, *args, **kwargs)
    earlier = _before_methods("soft_peft_before_test", model, args, kwargs)
    assert [m.setting for m in earlier] == [m.setting for m in after[1:]]  # greedy runs once
    for method in earlier:
        method.mode = f"before {method.mode}"
    results = run_decode_benchmark(model, tiny_tokenizer(), ["ab", "cde"], after + earlier, (1,), warmup=False)
    table = ratio_table(results, "before")
    rows = [line for line in table.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == len(earlier) == 3
    assert all(line.endswith("| yes |") for line in rows), table
    assert "Geometric mean of after / before over 3 settings" in table


@pytest.mark.skipif(not _has_revision("HEAD"), reason="not a git checkout")
def test_an_unknown_revision_fails_in_one_line():
    with pytest.raises(SystemExit, match="git archive no-such-revision"):
        import_revision("no-such-revision", alias="soft_peft_never")


@pytest.mark.skipif(not _has_revision("HEAD"), reason="not a git checkout")
def test_a_revision_without_the_old_harness_runs_its_own_decoders(monkeypatch):
    before = import_revision("HEAD", alias="soft_peft_head_test")
    calls = []
    real = before.inference.dynamic_generate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(before.inference, "dynamic_generate", counted)
    model = tiny_model("llama")
    args, kwargs = (4, [2], "adaptive", [2], [0.5], [2]), {"modes": ["dynamic"]}
    (method,) = _before_methods("soft_peft_head_test", model, args, kwargs)
    method.run(tiny_tokenizer()(["ab"], return_tensors="pt").input_ids, None)
    assert calls == [1]  # that revision's decoder ran, not today's
