"""How to serve an extracted SoFT exit as the draft model of speculative decoding, in the engines users serve with.

No serving engine ships an early-exit drafter that shares the target's KV cache, but transformers, vLLM and SGLang
all run a separate draft model that shares the target's tokenizer, which an extracted exit is. The configurations
below follow each engine's documentation of separate-draft-model speculative decoding:

- transformers: ``model.generate(..., assistant_model=draft)``;
- vLLM: ``speculative_config={"method": "draft_model", "model": DRAFT, "num_speculative_tokens": k}``;
- SGLang: ``--speculative-algorithm STANDALONE --speculative-draft-model-path DRAFT`` with ``--speculative-num-steps``,
  ``--speculative-eagle-topk 1`` and ``--speculative-num-draft-tokens``.

Kept free of torch imports: `soft-peft extract` prints these before anything heavy is imported.
"""

from __future__ import annotations

import json
import shlex

__all__ = ["draft_model_invocations", "sglang_launch_args", "vllm_speculative_config"]


def vllm_speculative_config(draft: str, num_speculative_tokens: int) -> dict:
    """vLLM's ``speculative_config`` for a separate draft model.

    Args:
        draft: The draft model's folder or Hub id.
        num_speculative_tokens: Tokens the draft proposes per step.

    Returns:
        ``{"method": "draft_model", "model": draft, "num_speculative_tokens": k}``.
    """
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": int(num_speculative_tokens)}


def sglang_launch_args(target: str, draft: str, num_speculative_tokens: int) -> list[str]:
    """``python -m sglang.launch_server`` arguments serving ``target`` with ``draft`` as a STANDALONE draft model.

    A chain of ``k`` drafted tokens: ``--speculative-num-steps k``, ``--speculative-eagle-topk 1`` (no tree) and
    ``--speculative-num-draft-tokens k + 1`` (the drafts plus the verified token).

    Args:
        target: The target model's folder or Hub id.
        draft: The draft model's folder or Hub id.
        num_speculative_tokens: Tokens the draft proposes per step.

    Returns:
        The argument list, without the ``python -m sglang.launch_server`` prefix.
    """
    k = int(num_speculative_tokens)
    return [
        "--model-path", target,
        "--speculative-algorithm", "STANDALONE",
        "--speculative-draft-model-path", draft,
        "--speculative-num-steps", str(k),
        "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", str(k + 1),
    ]  # fmt: skip


def draft_model_invocations(target: str, draft: str, num_speculative_tokens: int = 5) -> dict[str, str]:
    """The transformers, vLLM and SGLang invocations that serve ``target`` with ``draft`` as its draft model.

    Args:
        target: The full model (folder or Hub id) whose outputs are served.
        draft: The extracted exit (folder or Hub id), which shares the target's tokenizer.
        num_speculative_tokens: Tokens the draft proposes per step (vLLM and SGLang; transformers adapts its own).

    Returns:
        ``{"transformers": python, "vllm": python, "vllm serve": shell, "sglang": shell}``, each ready to paste.
    """
    config = vllm_speculative_config(draft, num_speculative_tokens)
    transformers_code = "\n".join(
        [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"tokenizer = AutoTokenizer.from_pretrained({target!r})",
            f"model = AutoModelForCausalLM.from_pretrained({target!r})",
            f"assistant = AutoModelForCausalLM.from_pretrained({draft!r})",
            'inputs = tokenizer("Question: ...", return_tensors="pt")',
            "output = model.generate(**inputs, assistant_model=assistant, max_new_tokens=128)",
        ]
    )
    vllm_code = "\n".join(
        [
            "from vllm import LLM",
            f"llm = LLM(model={target!r}, speculative_config={config!r})",
        ]
    )
    vllm_serve = f"vllm serve {shlex.quote(target)} --speculative-config {shlex.quote(json.dumps(config))}"
    sglang_args = sglang_launch_args(target, draft, num_speculative_tokens)
    sglang = shlex.join(["python", "-m", "sglang.launch_server", *sglang_args])
    return {"transformers": transformers_code, "vllm": vllm_code, "vllm serve": vllm_serve, "sglang": sglang}
