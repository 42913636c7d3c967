"""SoFT on TriviaQA (closed-book): prompt `Question: ...\nAnswer:`, completion a space and the answer's `value`. Same
code path and flags as `examples/alpaca.py`; a local JSON/JSONL file needs `question` and `answer` (a string or a
`{"value": ...}` dict).

```bash
accelerate launch examples/triviaqa.py --output_dir runs/triviaqa-soft --max_steps 100
accelerate launch --config_file recipes/accelerate/zero3.yaml examples/triviaqa.py \
    --config recipes/llama2_13b_triviaqa_zero3.yaml
```
"""

import os
import sys

from soft_peft.cli.train import main

if __name__ == "__main__":
    defaults = dict(dataset_name="mandarjoshi/trivia_qa", dataset_config="rc.nocontext", dataset_format="triviaqa")
    sys.exit(main(prog=os.path.basename(__file__), **defaults))
