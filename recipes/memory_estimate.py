"""Per-GPU memory of a SoFT recipe, computed from the model's shape (no download): the numbers in recipes/README.md.

    python recipes/memory_estimate.py                      # LLaMA-2 13B, every recipe of recipes/README.md
    python recipes/memory_estimate.py --config path/to/config.json --gpus 8 --batch 4 --seq 512

Full fine-tuning's model states follow DeepSpeed's own estimator (`deepspeed.runtime.zero.stage3.
estimate_zero3_model_states_mem_needs`, no offload; tests/examples/test_memory_estimate.py checks the equality): 18
bytes per parameter divided by the GPU count, plus 4 bytes per parameter of the largest layer (the embedding here).
That is 2 bytes more per parameter than the ZeRO paper's 16 (2 bf16 weights + 2 bf16 gradients + 12 of fp32 master
weights and Adam moments; Rajbhandari et al., 2020), which the LoRA rows keep for their few trained parameters.
Activations with checkpointing keep each layer's bf16 input (batch * seq * hidden * 2 bytes per layer) plus one layer
recomputed in full, estimated as (34 h + 5 a s) bytes per token (Korthikanti et al., 2022, no sequence parallelism).
The SoFT head adds the chunked logits of one exit at a time, in fp32: tokens * min(vocab, chunk) * 4 bytes.

Parameters are counted in closed form, so that the script runs in a moment without torch; the tests check the counts
against transformers' model and PEFT's LoRA layers built on the meta device.
"""

from __future__ import annotations

import argparse
import json

GB = 1e9
# LLaMA-2 13B (meta-llama/Llama-2-13b-hf config.json)
LLAMA2_13B = dict(
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=40,
    vocab_size=32000,
    num_attention_heads=40,
    num_key_value_heads=40,
    tie_word_embeddings=False,
)


def _kv_size(cfg: dict) -> int:
    # Grouped-query attention: k and v project to num_key_value_heads * head_dim
    heads = cfg["num_attention_heads"]
    return cfg["hidden_size"] * cfg.get("num_key_value_heads", heads) // heads


def parameter_count(cfg: dict) -> int:
    """Parameters of a LLaMA-style decoder: q/k/v/o, SwiGLU MLP 3 h i, two norms per layer, embeddings, final norm."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    per_layer = 2 * h * h + 2 * h * _kv_size(cfg) + 3 * h * i + 2 * h
    return layers * per_layer + vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + h


def largest_layer_parameter_count(cfg: dict) -> int:
    """Parameters of the largest module (its own, not its children's): the embedding or head, else an MLP matrix."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    return max(cfg["vocab_size"] * h, h * i, h * h)


def lora_parameter_count(cfg: dict, rank: int) -> int:
    """LoRA on every linear layer of each decoder layer (q, k, v, o, gate, up, down): r * (in + out) each."""
    h, i, layers, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], _kv_size(cfg)
    return layers * rank * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))


def activations(cfg: dict, batch: int, seq: int, chunk: int = 32768) -> float:
    """Bytes of activations per GPU with activation checkpointing (bf16), plus the SoFT head's chunk (fp32)."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    tokens = batch * seq
    checkpoints = layers * tokens * h * 2
    one_layer = tokens * (34 * h + 5 * heads * seq)
    head_chunk = tokens * min(cfg["vocab_size"], chunk) * 4
    return checkpoints + one_layer + head_chunk


def estimate(cfg: dict, gpus: int, batch: int, seq: int, lora_rank: int | None, shard: bool) -> dict[str, float]:
    """GB per GPU: weights, trained states (grads + Adam + master weights), activations, total.

    Args:
        cfg: The model's shape (config.json keys). gpus: GPUs the states are sharded over when `shard`.
        batch, seq: Per-device batch size and sequence length. lora_rank: LoRA rank, or `None` for full training.
        shard: ZeRO-3 / FSDP sharding of the states.

    Returns:
        `params_B`, `weights_GB`, `grads_adam_GB`, `activations_GB` and `total_GB`.
    """
    params = parameter_count(cfg)
    divisor = gpus if shard else 1
    if lora_rank is None:  # DeepSpeed's ZeRO-3 estimate: 18 bytes per parameter + 4 per largest-layer parameter
        weights, states = 2 * params / divisor, 16 * params / divisor + 4 * largest_layer_parameter_count(cfg)
    else:  # frozen bf16 base, LoRA weights trained with mixed-precision Adam
        lora = lora_parameter_count(cfg, lora_rank)
        weights, states = 2 * params / divisor, 16 * lora / divisor
    acts = activations(cfg, batch, seq)
    return {
        "params_B": params / 1e9,
        "weights_GB": weights / GB,
        "grads_adam_GB": states / GB,
        "activations_GB": acts / GB,
        "total_GB": (weights + states + acts) / GB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a model's config.json (default: LLaMA-2 13B)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size")
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    args = parser.parse_args()
    cfg = LLAMA2_13B if args.config is None else json.load(open(args.config))
    rows = [
        ("full, no sharding", None, False),
        (f"full, ZeRO-3 / FSDP2 on {args.gpus} GPUs", None, True),
        ("LoRA r=32, DDP", 32, False),
        (f"LoRA r=32, ZeRO-3 on {args.gpus} GPUs", 32, True),
    ]
    print(f"per-device batch {args.batch} x {args.seq} tokens, activation checkpointing on; GB per GPU")
    print(f"{'setting':<34} {'params(B)':>9} {'weights':>8} {'grad+Adam':>9} {'activ.':>7} {'total':>7}")
    for name, rank, shard in rows:
        e = estimate(cfg, args.gpus, args.batch, args.seq, rank, shard)
        print(
            f"{name:<34} {e['params_B']:>9.3f} {e['weights_GB']:>8.1f} {e['grads_adam_GB']:>9.1f} "
            f"{e['activations_GB']:>7.2f} {e['total_GB']:>7.1f}"
        )


if __name__ == "__main__":
    main()
