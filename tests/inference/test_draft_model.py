"""An exit written by `soft-peft extract` is a draft model for transformers' assisted generation: the full model's
`generate(assistant_model=<extracted exit>)` is token-identical to its greedy `generate` (the golden test)."""

import pytest
import torch
from inference_helpers import prompts
from tiny_models import GEN_ARCHS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from soft_peft.cli import main as soft_peft_main
from soft_peft.exit_head import find_exit_head


@pytest.mark.parametrize("arch", GEN_ARCHS)
@pytest.mark.parametrize("draft_layers", [1, 3])
def test_assistant_model_from_extract_is_token_identical_to_greedy(arch, draft_layers, tmp_path):
    model = tiny_model(arch)
    model.config.soft_exit_layers = [1, 3, 4]
    model.save_pretrained(tmp_path / "full")
    tiny_tokenizer().save_pretrained(tmp_path / "full")
    argv = ["extract", "--model_name_or_path", str(tmp_path / "full"), "--num_layers", str(draft_layers)]
    assert soft_peft_main([*argv, "--output_dir", str(tmp_path / "draft")]) == 0
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert draft.config.num_hidden_layers == draft_layers
    accepted_any = False
    for seed in range(3):  # assisted generation runs batch 1
        input_ids, _ = prompts(1, 6 + seed, seed=seed)
        greedy = target.generate(input_ids, do_sample=False, max_new_tokens=24)
        assisted = target.generate(input_ids, do_sample=False, max_new_tokens=24, assistant_model=draft)
        assert torch.equal(assisted, greedy), seed
        # The draft's own greedy continuation is what exit `draft_layers` of the target predicts
        with torch.no_grad():
            hidden = target(greedy, output_hidden_states=True).hidden_states[draft_layers]
            exit_next = find_exit_head(target).logits_from_raw(hidden).argmax(-1)
            draft_next = draft(greedy).logits.argmax(-1)
        assert torch.equal(exit_next, draft_next)
        accepted_any |= bool((draft_next[0, input_ids.shape[1] - 1 : -1] == greedy[0, input_ids.shape[1] :]).any())
    assert accepted_any or draft_layers == 1  # a 3-of-4-layer draft agrees with the full model somewhere
