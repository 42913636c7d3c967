"""SmolLM2-135M (30 layers, 49k vocabulary): the decoders reproduce greedy `generate` on a real model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from soft_peft import dynamic_generate, self_speculative_generate

PROMPTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?\n"
    "Answer: ",
    "Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?\nAnswer: ",
]


@pytest.mark.slow
def test_smollm2_greedy_identity(smollm2_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads when the CPU is shared
    try:
        _check_identity(smollm2_path)
    finally:
        torch.set_num_threads(threads)


def _check_identity(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(batch.attention_mask.all()), "the two prompts should need padding"
    expected = model.generate(**batch, do_sample=False, max_new_tokens=16)
    for draft_exit in (15, 27):
        out = self_speculative_generate(model, batch.input_ids, draft_exit, 16, attention_mask=batch.attention_mask)
        assert torch.equal(out.sequences, expected), draft_exit
    out = dynamic_generate(model, batch.input_ids, [15, 21, 27], 1.0, 16, attention_mask=batch.attention_mask)
    assert torch.equal(out.sequences, expected)
