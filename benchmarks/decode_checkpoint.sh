#!/usr/bin/env bash
# The SoFT checkpoint that `python -m benchmarks.decode_cost` measures by default: SmolLM2-135M-Instruct trained
# with the project's own GSM8K example (8 exits, 9..30) on GSM8K train, the 200 held-out rows excluded. Three stages,
# as it was made: 150 steps, then 300 more from that checkpoint, then 300 more again, each with another data order
# (the learning-rate schedule restarts). Batch 4, max_length 256, lr 1e-4, bf16 autocast on CPU. About 25 + 55 + 60
# minutes on 2 CPU cores.
#   bash benchmarks/decode_checkpoint.sh            # writes ~/.cache/soft_peft/runs/gsm8k-soft-{150,450,750}
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${SOFT_PEFT_RUNS:-$HOME/.cache/soft_peft/runs}"
# GSM8K train from the Hub, or a local copy of it: GSM8K_TRAIN=/path/to/train.jsonl bash benchmarks/decode_checkpoint.sh
data="${GSM8K_TRAIN:-openai/gsm8k}"
base="$(python tools/get_smollm2.py)"
common=(--dataset_name "$data" --per_device_train_batch_size 4 --max_length 256 --learning_rate 1e-4
        --logging_steps 10 --save_strategy no --use_cpu true --eval_holdout_size 200 --eval_strategy steps
        --eval_steps 100000 --report_to none --bf16 true
        --exit_loss_weights uniform)  # as it was made: the paper's loss, soft-peft's default before last:0.75
[ -f "$runs/gsm8k-soft-150/config.json" ] ||
    python examples/gsm8k.py --model_name_or_path "$base" --output_dir "$runs/gsm8k-soft-150" --max_steps 150 "${common[@]}"
[ -f "$runs/gsm8k-soft-450/config.json" ] ||
    python examples/gsm8k.py --model_name_or_path "$runs/gsm8k-soft-150" --output_dir "$runs/gsm8k-soft-450" \
        --max_steps 300 --seed 1 "${common[@]}"
[ -f "$runs/gsm8k-soft-750/config.json" ] ||
    python examples/gsm8k.py --model_name_or_path "$runs/gsm8k-soft-450" --output_dir "$runs/gsm8k-soft-750" \
        --max_steps 300 --seed 2 "${common[@]}"
