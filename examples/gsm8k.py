"""SoFT on GSM8K (grade-school maths): prompt `Question: ...\nAnswer:`, completion a space and the worked answer with
its `#### N` line. Same code path and flags as `examples/alpaca.py`.

```bash
accelerate launch examples/gsm8k.py --output_dir runs/gsm8k-soft --max_steps 100
# Offline: a local GSM8K JSONL, e.g. the 300-row sample shipped in data/
accelerate launch examples/gsm8k.py --dataset_name data/gsm8k/train_300.jsonl --output_dir runs/gsm8k-soft
accelerate launch --config_file recipes/accelerate/zero3.yaml examples/gsm8k.py \
    --config recipes/llama2_13b_gsm8k_zero3.yaml
```
"""

import os
import sys

from soft_peft.cli.train import main

if __name__ == "__main__":
    defaults = dict(dataset_name="openai/gsm8k", dataset_config="main", dataset_format="gsm8k")
    sys.exit(main(prog=os.path.basename(__file__), **defaults))
