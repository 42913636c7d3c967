"""Real models: the decoders reproduce greedy `generate` on SmolLM2-135M (30 layers, 49k vocabulary) and on Gemma 3
270M (18 layers, five of every six sliding-window, 262k vocabulary, scaled embeddings, four norms per block)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_peft import dynamic_generate, self_speculative_generate

PROMPTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?\n"
    "Answer: ",
    "Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?\nAnswer: ",
]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads when the CPU is shared
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_greedy_identity(smollm2_path, one_thread):
    check_identity(*load(smollm2_path), draft_exits=(15, 27), dynamic_exits=[15, 21, 27], max_new_tokens=16)


@pytest.mark.slow
def test_gemma3_greedy_identity(gemma3_path, one_thread):
    model, batch = load(gemma3_path)
    assert type(model).__name__ == "Gemma3ForCausalLM" and "sliding_attention" in model.config.layer_types
    # The texts fit Gemma's 512-token window; then the same weights with a window of 8, sliding over prompts and drafts
    check_identity(model, batch, draft_exits=(9,), dynamic_exits=[6, 12, 15], max_new_tokens=16)
    model.config.sliding_window = 8
    check_identity(model, batch, draft_exits=(6, 12), dynamic_exits=[6, 12, 15], max_new_tokens=16)


def load(path):
    """The fp32 model and the two prompts, left-padded."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(batch.attention_mask.all()), "the two prompts should need padding"
    return model, batch


def check_identity(model, batch, draft_exits, dynamic_exits, max_new_tokens):
    """Self-speculative decoding from each draft exit, and dynamic early exit at threshold 1.0, equal `generate`."""
    expected = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
    for draft_exit in draft_exits:
        out = self_speculative_generate(
            model, batch.input_ids, draft_exit, max_new_tokens, attention_mask=batch.attention_mask
        )
        assert torch.equal(out.sequences, expected), draft_exit
    out = dynamic_generate(
        model, batch.input_ids, dynamic_exits, 1.0, max_new_tokens, attention_mask=batch.attention_mask
    )
    assert torch.equal(out.sequences, expected)
