"""SoFT (Sorted Fine-Tuning) on Stanford Alpaca: every exit in `--exit_layers` becomes a usable sub-model.

Prompt-completion pairs use the Alpaca template and only the response is trained. Defaults: `tatsu-lab/alpaca` from
the Hub and `HuggingFaceTB/SmolLM2-135M`; `--dataset_name` also takes a local Alpaca JSON/JSONL file (`instruction`,
`input`, `output`) and `--model_name_or_path` a local folder. The final model, a vanilla transformers checkpoint with
`soft_exit_layers` in its config, is saved to `--output_dir`. Every `trl sft` flag works (`TrlParser`).

```bash
# One machine, the small default model (add --use_cpu true on a machine without a GPU)
accelerate launch examples/alpaca.py --output_dir runs/smollm2-alpaca-soft --max_steps 100

# The paper's setting: LLaMA-2 13B, 8 sub-models 12..40, 8 GPUs under DeepSpeed ZeRO-3
accelerate launch --config_file recipes/accelerate/zero3.yaml examples/alpaca.py \
    --config recipes/llama2_13b_alpaca_zero3.yaml

# LoRA, any recipe, overrides win over the recipe
accelerate launch examples/alpaca.py --config recipes/smollm2_135m_alpaca_cpu.yaml --use_peft --lora_r 16
```
"""

import os
import sys

from soft_peft.cli.train import main

if __name__ == "__main__":
    defaults = dict(dataset_name="tatsu-lab/alpaca", dataset_format="alpaca")
    sys.exit(main(prog=os.path.basename(__file__), **defaults))
