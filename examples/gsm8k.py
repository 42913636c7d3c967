"""SoFT on GSM8K (grade-school maths): prompt `Question: ...\nAnswer:`, completion a space and the worked answer with
its `#### N` line. Same code path and flags as `examples/alpaca.py`.

```bash
accelerate launch examples/gsm8k.py --dataset_name ../shared/data/gsm8k/train.jsonl --output_dir runs/gsm8k-soft
accelerate launch --config_file recipes/accelerate/zero3.yaml examples/gsm8k.py \
    --config recipes/llama2_13b_gsm8k_zero3.yaml
```
"""

import sys

from soft_peft.scripts.train import main

if __name__ == "__main__":
    sys.exit(main(dataset_name="openai/gsm8k", dataset_config="main", dataset_format="gsm8k"))
