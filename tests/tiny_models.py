"""Tiny random causal LMs built from configs, with no hub access, shared by the test modules."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    Lfm2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 101  # odd on purpose (ragged vocabulary chunks); matches tiny_tokenizer()
NUM_LAYERS = 4
SLIDING_WINDOW = 4  # of the sliding-window architectures: far shorter than the generation tests' texts

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=NUM_LAYERS
)


def _config(arch: str):
    if arch == "llama":
        return LlamaConfig(**_COMMON, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8)
    if arch == "gemma2":
        # Strong softcapping so that it changes the numbers measurably
        return Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0)
    if arch == "gemma3":  # Gemma 3's pattern (sliding, one full layer) with a window far shorter than the tests' texts
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
        return Gemma3TextConfig(
            **_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=SLIDING_WINDOW, layer_types=layer_types
        )
    if arch == "mistral_swa":  # every layer sliding (Mistral's `sliding_window`, no `layer_types`)
        return MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=SLIDING_WINDOW)
    if arch == "qwen2_swa":  # layers 1-2 full, 3-4 sliding (Qwen2's `max_window_layers`)
        window = dict(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=2)
        return Qwen2Config(**_COMMON, num_key_value_heads=2, **window)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=128)
    if arch == "phi":
        return PhiConfig(**_COMMON)
    if arch == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            num_hidden_layers=NUM_LAYERS,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
        )
    if arch == "cohere":
        return CohereConfig(**_COMMON, num_key_value_heads=2, logit_scale=0.5)
    if arch == "granite":
        return GraniteConfig(**_COMMON, num_key_value_heads=2, logits_scaling=4.0)
    if arch == "lfm2":  # final norm `embedding_norm`; convolution and attention layers
        return Lfm2Config(**_COMMON, num_key_value_heads=2, layer_types=["conv", "full_attention"] * 2)
    if arch == "bloom":  # two norms outside the layers: `word_embeddings_layernorm` and the final `ln_f`
        return BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=NUM_LAYERS, n_head=4)
    if arch == "qwen3_moe":
        experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        return Qwen3MoeConfig(**_COMMON, num_key_value_heads=2, head_dim=8, **experts)
    if arch == "mixtral":
        return MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2", "phi", "opt", "cohere", "granite", "lfm2", "bloom"]
MOE_ARCHS = ["qwen3_moe", "mixtral"]
# Generation tests use a representative subset to keep the suite fast
GEN_ARCHS = ["llama", "qwen2", "gpt2"]
# Sliding-window attention, all layers or some
SLIDING_ARCHS = ["gemma3", "mistral_swa", "qwen2_swa"]


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of architecture `arch` in fp32 eval mode."""
    config = _config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init gives near-uniform logits; scale the head up so losses and argmaxes are informative
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model.float().eval()


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<s>A:{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% else %}<s>U:{{ message['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<s>A:{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII whose vocabulary is exactly VOCAB, with a chat template."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    assert len(vocab) == VOCAB, len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
