"""`python -m benchmarks.serve_vllm` in vLLM's engine (its CPU build here): the exit `soft-peft extract` writes serves
as vLLM's draft model with the configuration `soft_peft.serving` builds, greedy decoding with it gives exactly the
tokens greedy decoding gives without it, and vLLM's acceptance counters are read; vLLM's greedy tokens are compared
with transformers' greedy `generate` on the same prompt ids (reported, not asserted: fp32 kernels differ).

vLLM pins a transformers older than soft-peft's floor, so it lives in a virtual environment of its own: the test finds
its Python through ``SOFT_PEFT_VLLM_PYTHON`` and is skipped without it (CONTRIBUTING.md, "vLLM engine test (CPU)").
It is opt-in, never found by itself: a run takes tens of minutes on a CPU, more than the whole suite's budget.
soft-peft's part (the checkpoint, `soft-peft extract`, the reference `generate`) runs in this Python; the vLLM Python
runs only the benchmark script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from example_runs import run
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_peft.exits import record_exit_layers

VLLM_PYTHON = "SOFT_PEFT_VLLM_PYTHON"
EXITS = [9, 12, 15, 18, 21, 24, 27, 30]  # the recommended recipe's, recorded as training records them
DRAFT_EXIT, NUM_SPECULATIVE_TOKENS, NUM_PROMPTS, MAX_NEW_TOKENS = 24, 4, 4, 16


def vllm_python() -> str | None:
    """``SOFT_PEFT_VLLM_PYTHON``, or ``None``."""
    return os.environ.get(VLLM_PYTHON) or None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        vllm_python() is None,
        reason=f"opt-in: set {VLLM_PYTHON} to a Python with vLLM (CONTRIBUTING.md, 'vLLM engine test (CPU)')",
    ),
]


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory) -> dict:
    """The benchmark's results for SmolLM2 saved as a SoFT checkpoint, with its exit ``DRAFT_EXIT`` extracted by the
    CLI as the draft model."""
    python = vllm_python()
    has_vllm = subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(not u.find_spec('vllm'))"])
    # A Python named on purpose that cannot run vLLM is a broken setup, not a reason to skip
    assert has_vllm.returncode == 0, f"{VLLM_PYTHON}={python} has no vllm package: point it at a Python with vLLM"
    root = tmp_path_factory.mktemp("vllm")
    full, draft, results = root / "soft", root / f"soft-{DRAFT_EXIT}L", root / "results.json"
    # SoFT's checkpoint layout, its exits recorded in the config as training records them. The exits are untrained:
    # what is checked here is that vLLM serves the extracted exit and keeps greedy's tokens, not how many it accepts
    # (training a few steps costs minutes on a shared CPU and would not change what is checked).
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    record_exit_layers(model, EXITS)
    model.save_pretrained(full)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(full)
    extract = ["extract", "--model_name_or_path", str(full), "--num_layers", str(DRAFT_EXIT), "--output_dir"]
    run([sys.executable, "-m", "soft_peft.cli", *extract, str(draft)])
    # One OpenMP thread on the last core this process may use; 2 GiB of KV cache (vLLM's CPU default is 4 GiB)
    core = str(max(os.sched_getaffinity(0)))
    command = [
        python, "-m", "benchmarks.serve_vllm", "--model", str(full), "--draft", str(draft),
        "--num_speculative_tokens", str(NUM_SPECULATIVE_TOKENS), "--num_prompts", str(NUM_PROMPTS),
        "--max_new_tokens", str(MAX_NEW_TOKENS), "--json", str(results),
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": core}
    printed = run(["taskset", "-c", core, *command], timeout=1800, env_overrides=env).stdout
    print(printed)
    return {"results": json.loads(results.read_text()), "full": full, "draft": draft}


def test_greedy_with_the_extracted_exit_as_draft_model_keeps_greedys_tokens(served):
    results = served["results"]
    greedy, drafted = results["greedy"], results["draft_model"]
    assert results["speculative_config"] == {
        "method": "draft_model",
        "model": str(served["draft"]),
        "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
    }
    assert drafted["prompt_token_ids"] == greedy["prompt_token_ids"] and len(greedy["token_ids"]) == NUM_PROMPTS
    assert all(0 < len(ids) <= MAX_NEW_TOKENS for ids in greedy["token_ids"])
    assert drafted["token_ids"] == greedy["token_ids"]


def test_vllms_acceptance_counters_are_read(served):
    spec = served["results"]["draft_model"]["spec_decode"]
    drafts, drafted, accepted = spec["num_drafts"], spec["num_draft_tokens"], spec["num_accepted_tokens"]
    # vLLM's draft_model method drafts k tokens at every step
    assert drafts > 0 and drafted == NUM_SPECULATIVE_TOKENS * drafts and 0 <= accepted <= drafted
    per_position = spec["accepted_per_position"]
    # A chain draft: a token is accepted only after every token before it, so the counts never rise with position
    assert len(per_position) == NUM_SPECULATIVE_TOKENS and sum(per_position) == accepted
    assert all(a >= b for a, b in zip(per_position, per_position[1:], strict=False))
    # Every generated token is either accepted from a draft or one the full model produced itself (one per step)
    generated = served["results"]["draft_model"]["tokens"]
    assert accepted < generated


def test_vllms_greedy_against_transformers_generate(served):
    """Reported: the share of vLLM's greedy token ids that transformers' greedy `generate` reproduces."""
    results = served["results"]
    model = AutoModelForCausalLM.from_pretrained(served["full"], dtype=torch.float32).eval()
    same = total = 0
    first_tokens = []
    for prompt, vllm_ids in zip(results["greedy"]["prompt_token_ids"], results["greedy"]["token_ids"], strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        reference = out[0, len(prompt) :].tolist()
        # Position by position up to the longer one: a token one side did not produce counts as different
        same += sum(a == b for a, b in zip(vllm_ids, reference, strict=False))
        total += max(len(vllm_ids), len(reference))
        first_tokens.append(vllm_ids[0] == reference[0])
    print(f"vLLM greedy against transformers greedy generate: {same}/{total} token ids identical ({same / total:.1%})")
    # The first token is one argmax of the prompt's logits: fp32 rounding does not move it unless two logits tie
    assert all(first_tokens)
