"""The printed serving invocations use exactly the configuration keys the engines document (transformers' is run by
tests/inference/test_draft_model.py, vLLM's in vLLM's CPU build by tests/benchmarks/test_serve_vllm.py where a vLLM
venv exists; SGLang's cannot run on a CPU without Intel AMX)."""

import ast
import json
import shlex

from soft_peft.serving import draft_model_invocations, sglang_launch_args, vllm_speculative_config

# vLLM, "Draft Models" (docs.vllm.ai/en/latest/features/speculative_decoding/draft_model/): `speculative_config` for a
# separate draft model has "model", "num_speculative_tokens" and "method": "draft_model"; `vllm serve` takes the same
# dict as JSON in --speculative-config.
VLLM_DRAFT_MODEL_KEYS = {"method", "model", "num_speculative_tokens"}
# SGLang, "Speculative Decoding" (docs.sglang.io/docs/advanced_features/speculative_decoding), standalone (small draft
# model): `python -m sglang.launch_server --model-path T --speculative-algorithm STANDALONE
# --speculative-draft-model-path D` with --speculative-num-steps, --speculative-eagle-topk and
# --speculative-num-draft-tokens.
SGLANG_FLAGS = {
    "--model-path",
    "--speculative-algorithm",
    "--speculative-draft-model-path",
    "--speculative-num-steps",
    "--speculative-eagle-topk",
    "--speculative-num-draft-tokens",
}

TARGET, DRAFT = "runs/soft model", "runs/soft-15L"  # a space, so quoting is exercised


def test_vllm_config_has_the_documented_keys():
    config = vllm_speculative_config(DRAFT, 4)
    assert set(config) == VLLM_DRAFT_MODEL_KEYS
    assert config == {"method": "draft_model", "model": DRAFT, "num_speculative_tokens": 4}


def test_vllm_snippets_parse_to_that_config():
    snippets = draft_model_invocations(TARGET, DRAFT, 4)
    call = ast.parse(snippets["vllm"]).body[-1].value
    assert ast.unparse(call.func) == "LLM"
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert keywords == {"model": TARGET, "speculative_config": vllm_speculative_config(DRAFT, 4)}
    words = shlex.split(snippets["vllm serve"])
    assert words[:3] == ["vllm", "serve", TARGET] and words[3] == "--speculative-config"
    assert json.loads(words[4]) == vllm_speculative_config(DRAFT, 4) and len(words) == 5


def test_sglang_command_uses_the_documented_flags():
    words = shlex.split(draft_model_invocations(TARGET, DRAFT, 4)["sglang"])
    assert words[:3] == ["python", "-m", "sglang.launch_server"]
    flags = dict(zip(words[3::2], words[4::2], strict=True))
    assert set(flags) == SGLANG_FLAGS
    assert flags == {
        "--model-path": TARGET,
        "--speculative-algorithm": "STANDALONE",
        "--speculative-draft-model-path": DRAFT,
        "--speculative-num-steps": "4",
        "--speculative-eagle-topk": "1",
        "--speculative-num-draft-tokens": "5",
    }
    assert sglang_launch_args(TARGET, DRAFT, 4) == words[3:]


def test_transformers_snippet_passes_the_draft_as_assistant_model():
    tree = ast.parse(draft_model_invocations(TARGET, DRAFT)["transformers"])
    calls = {ast.unparse(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    generate = calls["model.generate"]
    assert {k.arg: ast.unparse(k.value) for k in generate.keywords if k.arg}["assistant_model"] == "assistant"
    loads = [ast.literal_eval(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args and
             ast.unparse(n.func).endswith("from_pretrained")]  # fmt: skip
    assert loads == [TARGET, TARGET, DRAFT]
